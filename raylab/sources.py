"""Sources as Ray Data datasets of raw records, one record per row, never failing on a record.

Every source yields rows of the same all-string schema (RAW_SCHEMA):

    source         the source's name (config `name`, default source<N>)
    record_id      stable: file:line (jsonl, csv), file#index (json), file#row (parquet), the
                   file (text) -- files relative to the source's path, so ids survive a move; sql:<primary key or row hash>, page<N>#<i> / cursor<N>#<i> (http)
    raw            the record as read (UTF-8 with undecodable bytes backslash-escaped)
    payload        the parsed record as a JSON object string ('' when it could not be parsed)
    error          '' or a reason code (invalid_utf8, invalid_json, invalid_csv)
    error_message  what went wrong, for the quarantine

Ray's JSON and text readers fail a whole file on one bad line (RAY_NOTES.md), so the file
sources are `FileBasedDatasource`s that read bytes and parse line by line, streaming
(`_read_stream` yields a block every BLOCK_ROWS records). A source that cannot be read at
all (missing path, refused database, HTTP errors after retries) raises SourceError, which
the data stage reports as a user error naming the source.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.data.datasource.file_based_datasource import FileBasedDatasource

RAW_SCHEMA = pa.schema([(name, pa.string()) for name in ("source", "record_id", "raw", "payload", "error", "error_message")])
BLOCK_ROWS = 2048


class SourceError(Exception):
    """A whole source is unreadable; the message names it."""


def raw_row(source: str, record_id: str, raw: str, payload: str = "", error: str = "", message: str = "") -> dict:
    return {"source": source, "record_id": record_id, "raw": raw, "payload": payload, "error": error, "error_message": message}


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _decode(data: bytes) -> tuple[str, str | None]:
    """(text, error message or None); undecodable bytes are kept escaped for the quarantine."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return data.decode("utf-8", "backslashreplace"), f"byte {e.start} is not UTF-8 ({data[e.start:e.start + 1]!r})"


def parse_json_record(source: str, record_id: str, data: bytes) -> dict:
    text, bad = _decode(data)
    if bad:
        return raw_row(source, record_id, text, error="invalid_utf8", message=bad)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return raw_row(source, record_id, text, error="invalid_json", message=f"{e.msg} at column {e.colno}")
    return raw_row(source, record_id, text, payload=json.dumps(value, ensure_ascii=False))


def source_root(path: str) -> str:
    """The directory record ids are relative to: the path itself for a directory, else the
    directory holding the file (or the glob's fixed prefix); without a URI scheme, as Ray
    hands paths to readers."""
    import os

    bare = path.split("://", 1)[-1]
    if any(c in bare for c in "*?["):
        bare = bare[: min(bare.index(c) for c in "*?[" if c in bare)]
        return bare.rsplit("/", 1)[0]
    if "://" not in path and os.path.isdir(path):
        return bare.rstrip("/")
    return bare.rsplit("/", 1)[0] if "." in bare.rsplit("/", 1)[-1] else bare.rstrip("/")


class _Streaming(FileBasedDatasource):
    def __init__(self, paths, source: str, **kwargs):
        super().__init__(paths, file_extensions=self._FILE_EXTENSIONS, **kwargs)
        self.source = source
        self.root = source_root(paths)

    def rel(self, path: str) -> str:
        """A file's id part: relative to the source root, so ids (and the train/val split
        derived from them) do not change when the corpus moves to another directory."""
        bare = path.split("://", 1)[-1]
        return bare[len(self.root):].lstrip("/") if bare.startswith(self.root + "/") else bare.rsplit("/", 1)[-1]

    def _chunks(self, rows: Iterator[dict]) -> Iterator[pa.Table]:
        batch = []
        for row in rows:
            batch.append(row)
            if len(batch) >= BLOCK_ROWS:
                yield _table(batch)
                batch = []
        if batch:
            yield _table(batch)


def _lines(f, size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without the newline), streaming."""
    leftover, number = b"", 0
    while True:
        chunk = f.read(size)
        if not chunk:
            break
        parts = (leftover + chunk).split(b"\n")
        leftover = parts.pop()
        for line in parts:
            number += 1
            yield number, line.rstrip(b"\r")
    if leftover:
        yield number + 1, leftover.rstrip(b"\r")


class JsonlDatasource(_Streaming):
    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        rows = (
            parse_json_record(self.source, f"{self.rel(path)}:{n}", line)
            for n, line in _lines(f)
            if line.strip()  # blank lines separate nothing and are not records
        )
        yield from self._chunks(rows)


class JsonDatasource(_Streaming):
    """A JSON file holding a list of records (or one object)."""

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        row = parse_json_record(self.source, self.rel(path), f.readall())
        if row["error"]:
            yield _table([row])
            return
        value = json.loads(row["payload"])
        items = value if isinstance(value, list) else [value]
        yield from self._chunks(
            raw_row(self.source, f"{self.rel(path)}#{i}", json.dumps(item, ensure_ascii=False), json.dumps(item, ensure_ascii=False))
            for i, item in enumerate(items)
        )


class CsvDatasource(_Streaming):
    """CSV with a header row; quoted newlines allowed; a row with the wrong field count or
    undecodable bytes is one bad record, not a bad file."""

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        text = io.TextIOWrapper(io.BufferedReader(_RawAdapter(f)), encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            return
        yield from self._chunks(self._rows(reader, header, self.rel(path)))

    def _rows(self, reader, header: list[str], path: str) -> Iterator[dict]:
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield raw_row(self.source, f"{path}:{reader.line_num}", "", error="invalid_csv", message=str(e))
                continue
            record_id = f"{path}:{reader.line_num}"
            raw = ",".join(values).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if any("\udc80" <= ch <= "\udcff" for v in values for ch in v):
                yield raw_row(self.source, record_id, raw, error="invalid_utf8", message="the row holds bytes that are not UTF-8")
            elif len(values) != len(header):
                yield raw_row(self.source, record_id, raw, error="invalid_csv",
                              message=f"{len(values)} fields, the header has {len(header)}")
            else:
                yield raw_row(self.source, record_id, raw, json.dumps(dict(zip(header, values, strict=True)), ensure_ascii=False))


class _RawAdapter(io.RawIOBase):
    """Lets io.TextIOWrapper read a pyarrow NativeFile."""

    def __init__(self, f):
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class TextDatasource(_Streaming):
    """One document per .txt/.md file; the path is kept in the record as `path`."""

    _FILE_EXTENSIONS = ["txt", "md", "markdown"]

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        text, bad = _decode(f.readall())
        if bad:
            yield _table([raw_row(self.source, self.rel(path), text, error="invalid_utf8", message=bad)])
        else:
            payload = json.dumps({"text": text, "path": path}, ensure_ascii=False)
            yield _table([raw_row(self.source, self.rel(path), text, payload)])


class ParquetRowsDatasource(_Streaming):
    """Parquet rows with their file and row number as the record id."""

    _FILE_EXTENSIONS = ["parquet"]

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # Parquet needs random access (the footer)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BLOCK_ROWS):
            rows = []
            for record in batch.to_pylist():
                text = json.dumps(record, ensure_ascii=False, default=str)
                rows.append(raw_row(self.source, f"{self.rel(path)}#{index}", text, text))
                index += 1
            yield _table(rows)


FILE_DATASOURCES = {
    "jsonl": JsonlDatasource, "json": JsonDatasource, "csv": CsvDatasource,
    "text": TextDatasource, "parquet": ParquetRowsDatasource,
}


# ---------------------------------------------------------------- SQL


def sql_rows_to_raw(batch: pa.Table, source: str, id_field: str | None) -> pa.Table:
    rows = []
    for record in batch.to_pylist():
        text = json.dumps(record, ensure_ascii=False, default=str, sort_keys=True)
        if id_field and record.get(id_field) is not None:
            record_id = f"sql:{record[id_field]}"
        else:  # no key: the row's content is its identity
            record_id = "sql:" + hashlib.sha256(text.encode()).hexdigest()[:16]
        rows.append(raw_row(source, record_id, text, text))
    return _table(rows)


# ---------------------------------------------------------------- HTTP


def dig(value: Any, dotted: str) -> Any:
    """value['a']['b'] for 'a.b'; '' is the value itself."""
    for part in filter(None, dotted.split(".")):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class HttpDatasource(Datasource):
    """A paginated JSON API read in one task, a block per page (pages are sequential).

    `headers` arrive expanded (secrets resolved by the driver); retries with exponential
    backoff on connection errors, 429 and 5xx; other 4xx fail at once.
    """

    def __init__(self, spec: dict, source: str, headers: dict[str, str]):
        super().__init__()
        self.spec, self.source, self.headers = spec, source, headers

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return f"Http({self.source})"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(self._pages, meta, schema=RAW_SCHEMA)]

    def _get(self, params: dict[str, Any]) -> Any:
        s = self.spec
        url = s["url"]
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        last = ""
        for attempt in range(s["retries"] + 1):
            if attempt:
                time.sleep(s["backoff_s"] * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, headers={"Accept": "application/json", **self.headers})
                with urllib.request.urlopen(request, timeout=s["timeout_s"]) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code != 429 and e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                last = f"response is not JSON ({e})"
                break
        raise SourceError(f"data source {self.source!r}: GET {url} failed after {attempt + 1} attempt(s): {last}")

    def _pages(self) -> Iterator[pa.Table]:
        s = self.spec
        page, cursor = s["start_page"], None
        for n in range(s["max_pages"]):
            params: dict[str, Any] = {}
            if s["page_param"]:
                params[s["page_param"]] = page
            if s["cursor_param"] and cursor:
                params[s["cursor_param"]] = cursor
            body = self._get(params)
            records = dig(body, s["records_path"])
            if not isinstance(records, list):
                raise SourceError(f"data source {self.source!r}: records_path {s['records_path']!r} is not a list in the response to {s['url']}")
            label = f"page{page}" if s["page_param"] else f"cursor{n}" if s["cursor_param"] else "response"
            rows = [
                raw_row(self.source, f"{label}#{i}", text, text)
                for i, text in ((i, json.dumps(r, ensure_ascii=False)) for i, r in enumerate(records))
            ]
            if rows:
                yield _table(rows)
            if s["page_param"]:
                if not records:
                    return
                page += 1
            elif s["cursor_param"]:
                cursor = dig(body, s["next_cursor_path"])
                if not cursor:
                    return
            else:
                return
