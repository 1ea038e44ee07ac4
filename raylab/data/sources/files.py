"""File sources: jsonl, json, csv, parquet, and `text` (a directory of .txt/.md documents).

Ray's JSON and text readers fail a whole file on one bad line (RAY_NOTES.md), so these are
`FileBasedDatasource`s that read bytes and parse line by line, streaming (`_read_stream`
yields a block every BLOCK_ROWS records); a bad line is one quarantined record.

A jsonl, json, csv or text file raylab sealed (core/crypto.py: governance.encryption, e.g. an
upload the fine-tuning service kept) is decrypted with the run's key as it is read, so it
parses as its plaintext; without the key it is a UserError naming the file and the key, as
for raylab's own files. (A parquet source is read by pyarrow with random access and is not
opened this way: raylab seals no parquet file a source would name.)

    files = listing(src)                          # what a source covers, sorted
    ray.data.read_datasource(FILE_DATASOURCES[src.type](src.path, source=name))
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import itertools
import json
import os
from collections.abc import Iterator

import pyarrow as pa
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from raylab.core import crypto, storage
from raylab.data.sources.rows import BLOCK_ROWS, decode, parse_json_record, raw_row, table


def source_root(path: str) -> str:
    """The directory record ids are relative to: the path itself for a directory, else the
    directory holding the file (or the glob's fixed prefix); without a URI scheme, as Ray
    hands paths to readers."""
    bare = path.split("://", 1)[-1]
    if any(c in bare for c in "*?["):
        bare = bare[: min(bare.index(c) for c in "*?[" if c in bare)]
        return bare.rsplit("/", 1)[0]
    if "://" not in path and os.path.isdir(path):
        return bare.rstrip("/")
    return bare.rsplit("/", 1)[0] if "." in bare.rsplit("/", 1)[-1] else bare.rstrip("/")


def is_glob(path: str) -> bool:
    return any(c in path.split("://", 1)[-1] for c in "*?[")


class _Streaming(FileBasedDatasource):
    def __init__(self, paths: str | list[str], source: str, root: str | None = None, **kwargs):
        """`paths`: a file, a directory, or the files a glob matched (Ray's datasource does
        not expand globs itself); `root`: what record ids are relative to (the source's path)."""
        super().__init__(paths, file_extensions=self._FILE_EXTENSIONS, **kwargs)
        self.source = source
        self.root = source_root(root if root is not None else paths)

    def _open_input_source(self, filesystem, path: str, **open_args):
        return opened(super()._open_input_source(filesystem, path, **open_args),
                      lambda: super(_Streaming, self)._open_input_source(filesystem, path, **open_args), path)

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
                yield table(batch)
                batch = []
        if batch:
            yield table(batch)


def opened(f, reopen, path: str):
    """A just-opened stream `f` of `path`, ready for a parser: a plain file as `reopen()` opens
    it again (a stream cannot be rewound; pyarrow's native stream stays what parses every
    plain file), a sealed one decrypted as it is read, one segment at a time (its plaintext is
    never held whole)."""
    head = f.read(len(crypto.MAGIC))
    if not crypto.is_sealed(head):
        f.close()
        return reopen()
    sealed = io.BufferedReader(_ChunkStream(itertools.chain([head], iter(lambda: f.read(1 << 20), b"")), f))
    plain = crypto.open_chunks(sealed.read, storage.file_name(path), path)
    return _Opened(io.BufferedReader(_ChunkStream(plain, sealed)))


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
            yield table([row])
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


class _ChunkStream(io.RawIOBase):
    """A readable stream over an iterator of byte chunks; closing it closes `source`."""

    def __init__(self, chunks: Iterator[bytes], source):
        self._chunks, self._source, self._buffer = chunks, source, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._buffer:
            self._buffer = next(self._chunks, b"")
            if not self._buffer:
                return 0
        n = min(len(buffer), len(self._buffer))
        buffer[:n], self._buffer = self._buffer[:n], self._buffer[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


class _Opened:
    """What the parsers read a sealed file's plaintext through: `read(n)` and `readall()`,
    as on pyarrow's stream (whose `readall` needs a size a decrypting stream does not know)."""

    def __init__(self, reader: io.BufferedReader):
        self._reader = reader

    def read(self, n: int = -1) -> bytes:
        return self._reader.read(n)

    def readall(self) -> bytes:
        return self._reader.read()

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        text, bad = decode(f.readall())
        if bad:
            yield table([raw_row(self.source, self.rel(path), text, error="invalid_utf8", message=bad)])
        else:
            payload = json.dumps({"text": text, "path": path}, ensure_ascii=False)
            yield table([raw_row(self.source, self.rel(path), text, payload)])


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
            yield table(rows)


FILE_DATASOURCES = {
    "jsonl": JsonlDatasource, "json": JsonDatasource, "csv": CsvDatasource,
    "text": TextDatasource, "parquet": ParquetRowsDatasource,
}




def listing(src) -> list[str]:
    """The files a file source covers (local paths; URIs are listed by pyarrow)."""
    from pyarrow import fs

    exts = FILE_DATASOURCES[src.type]._FILE_EXTENSIONS
    if "://" in src.path and is_glob(src.path):
        scheme = src.path.split("://", 1)[0]
        filesystem, pattern = storage.resolve(src.path)
        prefix = source_root(src.path)
        found = filesystem.get_file_info(fs.FileSelector(prefix, recursive=True, allow_not_found=True))
        paths = [f"{scheme}://{f.path}" for f in found if f.type == fs.FileType.File and fnmatch.fnmatch(f.path, pattern)]
    elif "://" in src.path:
        filesystem, root = storage.resolve(src.path)
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.File:
            return [src.path]
        if info.type == fs.FileType.NotFound:
            return []
        scheme = src.path.split("://", 1)[0]
        found = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        paths = [f"{scheme}://{f.path}" for f in found if f.type == fs.FileType.File]
    elif os.path.isdir(src.path):
        paths = [os.path.join(d, f) for d, _, files in os.walk(src.path) for f in files]
    else:
        paths = glob.glob(src.path) if any(c in src.path for c in "*?[") else ([src.path] if os.path.exists(src.path) else [])
    if exts:
        paths = [p for p in paths if p.rsplit(".", 1)[-1].lower() in exts]
    return sorted(p for p in paths if not os.path.basename(p).startswith("."))
