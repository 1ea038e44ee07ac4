"""The control-plane database: raylab's own records (the audit log now; identities, jobs,
lineage later), through SQLAlchemy, its schema through Alembic migrations.

    url = controldb.url()                       # --database / governance.database (via
                                                # $RAYLAB_DATABASE_URL), else SQLite at $RAYLAB_HOME/raylab.db
    eng = controldb.engine(url)                 # migrated to the newest schema on first use
    with controldb.write_transaction(eng, "raylab.audit") as conn:
        ...                                     # one writer at a time, across processes and hosts

Migrations live in raylab/core/migrations/versions/ (add a table: a new revision whose
down_revision is the current head; `alembic -c raylab/core/migrations/alembic.ini revision -m
...` writes the file). Alembic's version table is `raylab_alembic_version`, not
`alembic_version`, because MLflow may share a PostgreSQL database and keeps its own.

Writers are serialised by the database itself: SQLite by `BEGIN IMMEDIATE` (the write lock
is taken when the transaction starts, so no two processes read the same head) with a busy
timeout; PostgreSQL by a transaction-level advisory lock (`pg_advisory_xact_lock`), released
when the transaction commits or its connection dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from raylab.core import runs
from raylab.core.secrets import redact_url
from raylab.errors import UserError

ENV = "RAYLAB_DATABASE_URL"
VERSION_TABLE = "raylab_alembic_version"
BUSY_TIMEOUT_S = 60.0  # how long a SQLite writer waits for another's write lock
MIGRATIONS = Path(__file__).resolve().parent / "migrations"

_lock = threading.Lock()
_engines: dict[tuple[int, str], object] = {}  # (pid, url) -> a migrated engine


def url(explicit: str | None = None) -> str:
    """The database URL: `explicit` (a flag), else $RAYLAB_DATABASE_URL (which the config's
    governance.database sets for raylab and its workers), else SQLite under $RAYLAB_HOME."""
    raw = explicit or os.environ.get(ENV) or default_url()
    try:
        return normalise(raw)
    except UserError as e:
        raise UserError(f"{origin(explicit)}: {e}") from None


def default_url() -> str:
    """SQLite under $RAYLAB_HOME: the database when nothing names one."""
    return f"sqlite:///{runs.home().control_db}"


def origin(explicit: str | None = None) -> str:
    """Where `url()` came from, for error messages."""
    return "--database" if explicit else f"{ENV} (or governance.database)" if os.environ.get(ENV) else "$RAYLAB_HOME"


def normalise(raw: str) -> str:
    """A URL SQLAlchemy opens with the driver raylab installs. SQLAlchemy 2.1 maps a bare
    `postgresql://` to psycopg 3, which raylab does not install; psycopg2 (the `postgres`
    extra) is what its SQL sources and registry locks already use, so users keep writing the
    libpq-style `postgresql://` URL and get psycopg2."""
    raw = raw.strip()
    if re.match(r"^postgres(ql)?://", raw):
        return re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", raw)
    if raw.startswith("postgresql+psycopg2://") or raw.startswith("sqlite:///"):
        return raw
    scheme = raw.split("://", 1)[0] if "://" in raw else raw[:20]
    raise UserError(f"control-plane database {scheme}://...: expected sqlite:///FILE or postgresql://USER@HOST/DB "
                    f"(set governance.database or {ENV})")


def is_sqlite(db_url: str) -> bool:
    return db_url.startswith("sqlite:")


def engine(db_url: str, create: bool = True):
    """A SQLAlchemy engine for `db_url`, its schema migrated to the newest revision (once per
    process). An unreachable database or a missing driver is a UserError naming the URL;
    with `create=False` (readers: `raylab audit verify|log|export`) so is a SQLite file that
    does not exist, rather than an empty log that verifies."""
    if not create and is_sqlite(db_url) and not os.path.exists(db_url.removeprefix("sqlite:///")):
        raise UserError(f"no control-plane database at {db_url.removeprefix('sqlite:///')} (nothing recorded yet, "
                        f"or the log is elsewhere: --database, governance.database or {ENV})")
    key = (os.getpid(), db_url)  # engines hold connections: never share one across a fork
    with _lock:
        if key not in _engines:
            eng = _create(db_url)
            try:
                _migrate(eng, db_url)
            except Exception:
                eng.dispose()
                raise
            _engines[key] = eng
        return _engines[key]


def _create(db_url: str):
    from sqlalchemy import create_engine, event

    if is_sqlite(db_url):
        path = db_url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        eng = create_engine(db_url, connect_args={"timeout": BUSY_TIMEOUT_S})

        # pysqlite starts transactions itself, lazily and DEFERRED; take that over (SQLAlchemy's
        # documented recipe) so a writer can ask for BEGIN IMMEDIATE.
        @event.listens_for(eng, "connect")
        def _connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None

        @event.listens_for(eng, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get("raylab_begin", "DEFERRED"))

        return eng
    try:
        import psycopg2  # noqa: F401 - the `postgres` extra
    except ImportError:
        raise UserError(f"control-plane database {redact_url(db_url)}: PostgreSQL needs psycopg2 "
                        "(pip install 'raylab[postgres]')") from None
    return create_engine(db_url, pool_pre_ping=True)


def advisory_key(name: str) -> int:
    """A signed 64-bit PostgreSQL advisory-lock key for a named writer."""
    return int.from_bytes(hashlib.sha256(f"raylab.controldb:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def write_transaction(eng, name: str) -> Iterator[object]:
    """A transaction that holds the database's write lock for `name` from its first statement
    to its commit (see the module docstring); commits when the block ends, rolls back if it
    raises."""
    from sqlalchemy import text

    with eng.connect() as conn:
        if eng.dialect.name == "sqlite":
            conn.execution_options(raylab_begin="IMMEDIATE")
        with conn.begin():
            if eng.dialect.name == "postgresql":
                conn.execute(text("select pg_advisory_xact_lock(:k)"), {"k": advisory_key(name)})
            yield conn


def _migrate(eng, db_url: str) -> None:
    """Upgrade the schema to the newest revision, one process at a time (the migration runs
    inside a write transaction, so concurrent first uses do not race to create tables)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.exc import OperationalError

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with write_transaction(eng, "migrate") as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except OperationalError as e:
        reason = (str(e.orig).strip().splitlines() or ["?"])[0]
        raise UserError(f"control-plane database {redact_url(db_url)} "
                        f"cannot be opened: {reason} (set governance.database or {ENV})") from None


def dispose_all() -> None:
    """Close every engine this process opened (tests; a process about to fork)."""
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()


def describe(db_url: str) -> str:
    """The URL with its password hidden, for messages."""
    return redact_url(db_url)

