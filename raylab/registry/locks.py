"""One lock per registered model around every alias move. MLflow tags and aliases have no
compare-and-set, so a promote or rollback (read the aliases, move them, append to the
history) is serialised here instead, by the store's kind:

- SQLite (`sqlite:///DIR/mlflow.db`) and a local file store: a lock file per model in
  `DIR/locks/`, held with flock, which the kernel drops when its holder exits or crashes.
  (Not `BEGIN IMMEDIATE` on MLflow's own database: it would hold SQLite's write lock while
  MLflow's writes through its own connection wait on it.)
- PostgreSQL: a session advisory lock on a connection of its own, keyed by the model name
  (closing the connection, or its holder dying, releases it).
- An MLflow server (http(s)://) or another database: no lock a client can take, so moves
  go unserialised (with a warning); two people promoting the same model at the same
  moment can then interleave. The alias history moves into the control-plane database.

    with alias_lock(store, "acme-assistant"):
        ...  # aliases read, aliases set, history appended

A lock not taken within `store.lock_timeout_s` is a UserError naming the lock and its holder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import time
from pathlib import Path

from raylab.core import storage
from raylab.errors import UserError
from raylab.registry.store import Store

log = logging.getLogger(__name__)
_warned: set[str] = set()


def lock_file(store: Store, name: str) -> str | None:
    """The lock file of a model in a SQLite or local file store (None for other stores)."""
    uri = store.uri
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).parent
    elif uri.startswith("file://") or ("://" not in uri and not uri.startswith("databricks")):
        root = Path(uri.removeprefix("file://"))
    else:
        return None
    return str(root / "locks" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.aliases.lock")


def advisory_key(name: str) -> int:
    """A signed 64-bit PostgreSQL advisory-lock key for a model's alias moves."""
    return int.from_bytes(hashlib.sha256(f"raylab.aliases:{name}".encode()).digest()[:8], "big", signed=True)


def _busy(what: str, name: str, timeout_s: float, holder: str) -> UserError:
    return UserError(f"registry lock {what} for model {name!r} is held by {holder or 'another process'} "
                     f"(waited {timeout_s:g}s): another promote or rollback of {name!r} is running; "
                     "retry when it ends, or stop the process that holds the lock")


@contextlib.contextmanager
def alias_lock(store: Store, name: str, poll_s: float = 0.05):
    """Hold the model's alias lock for the block (see the module docstring)."""
    path = lock_file(store, name)
    if path is not None:
        try:
            with storage.exclusive_lock(path, store.lock_timeout_s, poll_s):
                yield
        except storage.LockTimeout as e:
            raise _busy(path, name, store.lock_timeout_s, e.holder) from None
        return
    if store.uri.startswith("postgresql"):
        with _advisory_lock(store, name, poll_s):
            yield
        return
    if store.uri not in _warned:
        _warned.add(store.uri)
        log.warning("registry %s: alias moves cannot be locked on this kind of store; concurrent promotes or "
                    "rollbacks of one model may interleave", store.uri)
    yield


@contextlib.contextmanager
def _advisory_lock(store: Store, name: str, poll_s: float):
    try:
        import psycopg2  # the `postgres` extra, as for SQL data sources
    except ImportError:
        raise UserError(f"registry {store.uri}: locking alias moves on PostgreSQL needs psycopg2 "
                        "(pip install 'raylab[postgres]')") from None
    key, me = advisory_key(name), f"raylab alias lock: pid {os.getpid()} on {socket.gethostname()}"
    # MLflow's URI may name a SQLAlchemy driver (postgresql+psycopg2://); libpq takes none.
    conn = psycopg2.connect(re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", store.uri), application_name=me[:63])
    try:
        conn.autocommit = True  # a session lock, outside any transaction
        with conn.cursor() as cur:
            deadline = time.monotonic() + store.lock_timeout_s
            # pg_try_ rather than a blocking pg_advisory_lock: the wait keeps its deadline.
            while not _scalar(cur, "select pg_try_advisory_lock(%s)", (key,)):
                if time.monotonic() >= deadline:
                    raise _busy(f"pg_advisory_lock({key})", name, store.lock_timeout_s, _pg_holder(cur, key))
                time.sleep(poll_s)
            try:
                yield
            finally:
                cur.execute("select pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()  # also ends the session, which drops the lock if the unlock never ran


def _scalar(cur, sql: str, args: tuple):
    cur.execute(sql, args)
    return cur.fetchone()[0]


def _pg_holder(cur, key: int) -> str:
    """Who holds a bigint advisory lock: PostgreSQL splits the key into classid (high 32
    bits) and objid (low 32 bits), with objsubid 1."""
    cur.execute(
        "select a.pid, a.application_name, a.client_addr from pg_locks l join pg_stat_activity a on a.pid = l.pid "
        "where l.locktype = 'advisory' and l.granted and l.objsubid = 1 "
        "and l.classid::bigint = %s and l.objid::bigint = %s", ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF))
    row = cur.fetchone()
    return f"PostgreSQL backend {row[0]} ({row[1] or 'no application name'}, {row[2] or 'local'})" if row else ""
