"""SQL sources: a query's rows through `ray.data.read_sql`, SQLite or PostgreSQL.

    Connect("sqlite:///tickets.db")()           # a read-only DB-API connection
    check(url, query)                           # the query parses and its tables exist
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3

import pyarrow as pa

from raylab.core.secrets import scrub, url_secrets
from raylab.data.sources.rows import SourceError, raw_row, table


def sql_rows_to_raw(batch: pa.Table, source: str, id_field: str | None) -> pa.Table:
    rows = []
    for record in batch.to_pylist():
        text = json.dumps(record, ensure_ascii=False, default=str, sort_keys=True)
        if id_field and record.get(id_field) is not None:
            record_id = f"sql:{record[id_field]}"
        else:  # no key: the row's content is its identity
            record_id = "sql:" + hashlib.sha256(text.encode()).hexdigest()[:16]
        rows.append(raw_row(source, record_id, text, text))
    return table(rows)




def _sqlite_path(url: str) -> str | None:
    return os.path.abspath(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


class Connect:
    """A picklable DB-API connection factory for ray.data.read_sql.

    With a `source` name, the connection it makes turns a driver error while connecting,
    querying or fetching (a database stopped mid-query, say) into a SourceError naming the
    source, the rows fetched before it and the cause; `shown_url` is the redacted URL as
    configured, for that message."""

    def __init__(self, url: str, source: str | None = None, shown_url: str | None = None):
        self.url, self.source, self.shown_url = url, source, shown_url

    def _connect(self):
        path = _sqlite_path(self.url)
        if path is not None:  # read-only: never create an empty database by accident
            return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        import psycopg2  # the `postgres` extra

        return psycopg2.connect(self.url)

    def __call__(self):
        if self.source is None:
            return self._connect()
        try:
            return _Guarded(self._connect(), self)
        except Exception as e:
            raise self.failed(f"cannot connect to {self.shown_url}", 0, e) from None

    def failed(self, what: str, rows: int, e: BaseException) -> SourceError:
        cause = " ".join(str(e).split()) or type(e).__name__  # drivers' messages span lines
        return SourceError(scrub(f"data source {self.source!r} (sql): {what}, after {rows} rows: {cause}",
                                 url_secrets(self.url)))


class _Guarded:
    """A DB-API connection whose cursors raise SourceError (Connect.failed) on driver errors."""

    def __init__(self, conn, connect: Connect):
        self._conn, self._connect = conn, connect

    def cursor(self):
        return _GuardedCursor(self._conn.cursor(), self._connect)

    def commit(self):
        self._conn.commit()

    def rollback(self):
        self._conn.rollback()

    def close(self):
        self._conn.close()


class _GuardedCursor:
    def __init__(self, cursor, connect: Connect):
        self._cursor, self._connect, self.rows = cursor, connect, 0

    @property
    def description(self):
        return self._cursor.description

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            raise self._connect.failed(what, self.rows, e) from None

    def execute(self, *args):
        return self._call("the query failed", self._cursor.execute, *args)

    def executemany(self, *args):
        return self._call("the query failed", self._cursor.executemany, *args)

    def _fetched(self, rows):
        self.rows += len(rows)
        return rows

    def fetchone(self):
        row = self._call("reading a row failed", self._cursor.fetchone)
        self.rows += row is not None
        return row

    def fetchmany(self, *args):
        return self._fetched(self._call("reading rows failed", self._cursor.fetchmany, *args))

    def fetchall(self):
        return self._fetched(self._call("reading rows failed", self._cursor.fetchall))


def check(url: str, query: str) -> None:
    """Raise if the database cannot be reached or the query does not run (reads nothing)."""
    path = _sqlite_path(url)
    if path is not None and not os.path.isfile(path):
        raise OSError(f"no SQLite database at {path}")
    conn = Connect(url)()  # no source: check's errors are reported by describe_inputs
    try:  # the query parses and its tables exist; LIMIT 0 reads nothing
        conn.cursor().execute(f"SELECT * FROM ({query}) AS raylab_check LIMIT 0")
    finally:
        conn.close()
