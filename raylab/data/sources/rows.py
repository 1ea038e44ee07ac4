"""The raw-record contract every source yields: one row per record, never failing on one.

Every source yields rows of the same all-string schema (RAW_SCHEMA):

    source         the source's name (config `name`, default source<N>)
    record_id      stable: file:line (jsonl, csv), file#index (json), file#row (parquet), the
                   file (text) -- files relative to the source's path, so ids survive a move;
                   sql:<primary key or row hash>; page<N>#<i> / cursor<N>#<i> (http)
    raw            the record as read (UTF-8 with undecodable bytes backslash-escaped)
    payload        the parsed record as a JSON object string ('' when it could not be parsed)
    error          '' or a reason code (invalid_utf8, invalid_json, invalid_csv)
    error_message  what went wrong, for the quarantine

A source that cannot be read at all (missing path, a database down or stopped mid-query, HTTP
errors after retries, a body that is not JSON) raises SourceError, which the data stage
reports as a user error (exit 2); the message names the source, the position reached (page or
cursor and records read; rows fetched) and the cause, with any URL redacted.
"""

from __future__ import annotations

import json

import pyarrow as pa

RAW_SCHEMA = pa.schema([(name, pa.string()) for name in ("source", "record_id", "raw", "payload", "error", "error_message")])
BLOCK_ROWS = 2048


class SourceError(Exception):
    """A whole source is unreadable; the message names it."""


def raw_row(source: str, record_id: str, raw: str, payload: str = "", error: str = "", message: str = "") -> dict:
    return {"source": source, "record_id": record_id, "raw": raw, "payload": payload, "error": error, "error_message": message}


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def decode(data: bytes) -> tuple[str, str | None]:
    """(text, error message or None); undecodable bytes are kept escaped for the quarantine."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return data.decode("utf-8", "backslashreplace"), f"byte {e.start} is not UTF-8 ({data[e.start:e.start + 1]!r})"


def parse_json_record(source: str, record_id: str, data: bytes) -> dict:
    text, bad = decode(data)
    if bad:
        return raw_row(source, record_id, text, error="invalid_utf8", message=bad)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return raw_row(source, record_id, text, error="invalid_json", message=f"{e.msg} at column {e.colno}")
    return raw_row(source, record_id, text, payload=json.dumps(value, ensure_ascii=False))


