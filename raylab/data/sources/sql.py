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

from raylab.data.sources.rows import raw_row, table


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
    """A picklable DB-API connection factory for ray.data.read_sql."""

    def __init__(self, url: str):
        self.url = url

    def __call__(self):
        path = _sqlite_path(self.url)
        if path is not None:  # read-only: never create an empty database by accident
            return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        import psycopg2  # the `postgres` extra

        return psycopg2.connect(self.url)


def check(url: str, query: str) -> None:
    """Raise if the database cannot be reached or the query does not run (reads nothing)."""
    path = _sqlite_path(url)
    if path is not None and not os.path.isfile(path):
        raise OSError(f"no SQLite database at {path}")
    conn = Connect(url)()
    try:  # the query parses and its tables exist; LIMIT 0 reads nothing
        conn.cursor().execute(f"SELECT * FROM ({query}) AS raylab_check LIMIT 0")
    finally:
        conn.close()


def redact_url(url: str) -> str:
    """Keep ${env:...} references; drop a password written inline."""
    if "${env:" in url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
