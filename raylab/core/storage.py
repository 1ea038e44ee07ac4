"""Every file raylab writes or reads back goes through here, local paths and URIs alike
(s3://, gs://, file://), via pyarrow's filesystems.

    storage.write_text(run.manifest, text); storage.read_text(run.manifest)
    storage.write_parquet(dataset, run.split("train"))   # inside Ray's write tasks, per file
    storage.read_parquet(run.split("train"))              # a Ray Dataset, read per file
    storage.read_table(run.split("records"))              # the same files as one pyarrow Table
    storage.save_pretrained(model, run.train_final)       # transformers / peft objects
    storage.save_torch(optimizer.state_dict(), path); storage.save_figure(fig, path)

Why one module: several nodes need shared storage for the run directory, and encryption at
rest hooks in here: while `governance.encryption` is on ($RAYLAB_ENCRYPTION, raylab/core/crypto.py)
every write below is sealed (a fresh data key per file) and every read opens sealed files, so
no stage handles ciphertext itself; a directory that `from_pretrained` or safetensors must read
by path goes through `plain_dir`, a private temporary plaintext copy removed after loading. Parquet files are encoded and decoded by `write_table_to` and
`read_table_from`, which run inside Ray's write and read tasks (`ParquetSink`,
`ParquetFiles`), one file at a time: pyarrow's Parquet encryption objects cannot be pickled,
so a hook that encrypts must act there, not be passed from the driver. A test
(tests/unit/core/test_storage.py) fails when a module outside this one opens a file for
writing, calls `write_parquet`, `save_pretrained`, `torch.save`, `savefig` or copies files.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from raylab.core import crypto

# ---------------------------------------------------------------- locations


def filesystem(location: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    from pyarrow import fs

    if "://" not in location:
        return fs.LocalFileSystem(), os.path.abspath(location)
    return fs.FileSystem.from_uri(location)


resolve = filesystem  # the older name; both are used


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def local_path(location: str) -> str:
    """The filesystem path of a local location (file:// URIs included)."""
    return os.path.abspath(location.removeprefix("file://"))


def makedirs(location: str) -> None:
    fsys, path = filesystem(location)
    fsys.create_dir(path, recursive=True)


def exists(location: str) -> bool:
    from pyarrow import fs

    fsys, path = filesystem(location)
    return fsys.get_file_info(path).type != fs.FileType.NotFound


def reset_dir(location: str) -> None:
    """An empty directory at `location` (what was there is deleted)."""
    from pyarrow import fs

    fsys, path = filesystem(location)
    if fsys.get_file_info(path).type != fs.FileType.NotFound:
        fsys.delete_dir(path)
    fsys.create_dir(path, recursive=True)


def remove_dir(location: str) -> None:
    """Delete a directory and what it holds, if it is there."""
    from pyarrow import fs

    fsys, path = filesystem(location)
    if fsys.get_file_info(path).type != fs.FileType.NotFound:
        fsys.delete_dir(path)


def remove_file(location: str) -> bool:
    """Delete one file if it is there; whether it was."""
    from pyarrow import fs

    fsys, path = filesystem(location)
    if fsys.get_file_info(path).type != fs.FileType.File:
        return False
    fsys.delete_file(path)
    return True


# ---------------------------------------------------------------- bytes and text


def file_name(location: str) -> str:
    """A file's identity in its encryption (the name; see raylab/core/crypto.py for why)."""
    return location.rstrip("/").rsplit("/", 1)[-1]


def write_bytes(location: str, data: bytes) -> str:
    """Write `data` to a file, creating its directory; returns `location` (sealed while
    encryption is on)."""
    fsys, path = filesystem(location)
    fsys.create_dir(path.rsplit("/", 1)[0], recursive=True)
    settings = crypto.active()
    with fsys.open_output_stream(path) as f:
        if settings is None:
            f.write(data)
        else:
            for part in crypto.seal_chunks([data], file_name(location), settings):
                f.write(part)
    return location


def read_bytes(location: str) -> bytes:
    """A file's bytes (opened when sealed: a missing or wrong key is a UserError naming it)."""
    fsys, path = filesystem(location)
    with fsys.open_input_stream(path) as f:
        data = f.read()
    if crypto.is_sealed(data):
        return crypto.open_sealed(data, file_name(location), location)
    return data


def write_text(location: str, text: str) -> str:
    """Write `text` (UTF-8) to a file, creating its directory; returns `location`."""
    return write_bytes(location, text.encode("utf-8"))


def replace_text(location: str, text: str) -> str:
    """Replace a file's text whole: written beside it under a temporary name, then renamed over
    it, so a process killed mid-write leaves the old text or the new, never a torn file (state
    that a restarted process resumes from). On an object store a put is already all or nothing."""
    from pyarrow import fs

    if "://" in location:
        return write_text(location, text)
    fsys, path = filesystem(location)
    fsys.create_dir(path.rsplit("/", 1)[0], recursive=True)
    settings = crypto.active()
    data = text.encode("utf-8")
    if settings is not None:  # sealed under the final name: the name is the file's identity
        data = crypto.seal(data, file_name(location), settings)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with fsys.open_output_stream(tmp) as f:
            f.write(data)
        fsys.move(tmp, path)  # a rename on a local filesystem: atomic
    finally:
        if fsys.get_file_info(tmp).type != fs.FileType.NotFound:
            fsys.delete_file(tmp)
    return location


def read_text(location: str) -> str:
    return _open_lines(read_bytes(location).decode("utf-8"), location)


def open_local_log(path: str):
    """A local file opened for unbuffered binary appends: a process's own log (the console
    filter's), written line by line while the process runs, so never an object store."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "ab", buffering=0)  # noqa: SIM115 - the caller closes it


_SEALED_LINE = "RLE1:"  # an appended record sealed on its own (base64 of a sealed file)


def append_text(location: str, text: str) -> str:
    """Append to a file (JSON lines). Object stores cannot append, so there the file is
    rewritten whole: fine for the small, rare appends raylab makes (events). While encryption
    is on each append is sealed on its own and stored as one line (`read_text` opens them)."""
    settings = crypto.active()
    if settings is not None:
        import base64

        text = _SEALED_LINE + base64.b64encode(crypto.seal(text.encode(), file_name(location), settings)).decode() + "\n"
    if is_local(location):
        path = local_path(location)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return location
    fsys, path = filesystem(location)
    before = b""
    if exists(location):
        with fsys.open_input_stream(path) as f:
            before = f.read()  # as stored: sealed lines stay sealed
    fsys.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fsys.open_output_stream(path) as f:
        f.write(before + text.encode())
    return location


def _open_lines(text: str, location: str) -> str:
    """A file of appended records with its sealed lines opened."""
    import base64

    if _SEALED_LINE not in text:
        return text
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith(_SEALED_LINE):
            blob = base64.b64decode(line[len(_SEALED_LINE):].strip())
            out.append(crypto.open_sealed(blob, file_name(location), location).decode("utf-8"))
        else:
            out.append(line)
    return "".join(out)


def list_files(location: str, suffix: str = "") -> list[str]:
    """The files directly under a directory (local or URI) whose names end with `suffix`,
    sorted by name; [] when the directory does not exist."""
    from pyarrow import fs

    fsys, path = filesystem(location)
    if fsys.get_file_info(path).type == fs.FileType.NotFound:
        return []
    infos = fsys.get_file_info(fs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == fs.FileType.File and i.base_name.endswith(suffix))
    return [join(location, n) for n in names]


def create_private_file(path: str, data: bytes) -> bool:
    """Create a local file readable only by its owner (0600, its directory 0700) holding
    `data`, atomically: a temporary file is linked into place, so a concurrent reader never
    sees a half-written file. Returns False (and leaves the file alone) when it exists."""
    path = local_path(path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails when the file exists: the first creator wins
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def sha256(location: str) -> str:
    """The sha256 of the file's content, streamed: of its plaintext when it is sealed, so a
    checksum survives `raylab keys rotate` (DESIGN.md: checksums are over plaintext)."""
    import hashlib

    fsys, path = filesystem(location)
    digest = hashlib.sha256()
    with fsys.open_input_stream(path) as f:
        head = f.read(len(crypto.MAGIC))
        if crypto.is_sealed(head):
            f = _Prepended(head, f)
            for chunk in crypto.open_chunks(f.read, file_name(location), location):
                digest.update(chunk)
            return digest.hexdigest()
        digest.update(head)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Prepended:
    """A stream with bytes already read put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out + (self.stream.read(n - len(out)) if len(out) < n else b"")
        return self.stream.read(n)


# ---------------------------------------------------------------- directories


def copy_dir(source: str, location: str) -> str:
    """Copy a directory's files (local path or URI) to `location`, replacing it."""
    from pyarrow import fs

    reset_dir(location)
    src_fs, src = filesystem(source)
    dst_fs, dst = filesystem(location)
    fs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    return location


def copy_to_local(location: str, local_dir: str) -> str:
    """Copy a directory (local path or URI) into a local directory; returns `local_dir`."""
    from pyarrow import fs

    fsys, path = filesystem(location)
    os.makedirs(local_dir, exist_ok=True)
    fs.copy_files(path, os.path.abspath(local_dir), source_filesystem=fsys, destination_filesystem=fs.LocalFileSystem())
    return local_dir


def save_pretrained(obj: Any, location: str, **kwargs) -> str:
    """`obj.save_pretrained` (a transformers model or tokenizer, a peft model) at `location`:
    straight into a local directory; through a local staging directory for a URI, or (while
    encryption is on) a private one whose files are sealed into `location` and then deleted."""
    settings = crypto.active()
    if settings is not None:
        with _private_dir("raylab-save-") as staging:
            obj.save_pretrained(staging, **kwargs)
            _seal_tree(staging, location, settings)
        return location
    if is_local(location):
        path = local_path(location)
        os.makedirs(path, exist_ok=True)
        obj.save_pretrained(path, **kwargs)
        return location
    with tempfile.TemporaryDirectory(prefix="raylab-save-") as staging:
        obj.save_pretrained(staging, **kwargs)
        _copy_into(staging, location)
    return location


def _copy_into(source_dir: str, location: str) -> None:
    """Copy a local directory's files into `location` without deleting what is there."""
    from pyarrow import fs

    dst_fs, dst = filesystem(location)
    dst_fs.create_dir(dst, recursive=True)
    fs.copy_files(source_dir, dst, source_filesystem=fs.LocalFileSystem(), destination_filesystem=dst_fs)


def _seal_tree(source_dir: str, location: str, settings) -> None:
    """Seal every file of a local directory into `location` (same relative paths), streamed
    a segment at a time so a multi-GB safetensors file is never whole in memory."""
    for root, _, names in os.walk(source_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), source_dir).replace(os.sep, "/")
            target = join(location, rel)
            fsys, path = filesystem(target)
            fsys.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with open(os.path.join(root, name), "rb") as src, fsys.open_output_stream(path) as out:
                for part in crypto.seal_chunks(iter(lambda: src.read(crypto.SEGMENT), b""), name, settings):
                    out.write(part)


@contextlib.contextmanager
def _private_dir(prefix: str) -> Iterator[str]:
    """A temporary directory only this user can read, in memory (/dev/shm) where there is
    one, removed on exit: where plaintext may live while a model is saved or loaded."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix=prefix, dir=base)  # mkdtemp: mode 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def is_sealed_file(location: str) -> bool:
    fsys, path = filesystem(location)
    with fsys.open_input_stream(path) as f:
        return crypto.is_sealed(f.read(len(crypto.MAGIC)))


@contextlib.contextmanager
def plain_dir(location: str) -> Iterator[str]:
    """A local directory with `location`'s files readable by path (from_pretrained,
    safetensors): the directory itself when nothing in it is sealed (or it is a hub id, not a
    directory), else a private in-memory copy with every file opened, removed on exit."""
    local = local_path(location) if is_local(location) else None
    if local is None or not os.path.isdir(local):
        yield location
        return
    files = [os.path.join(root, n) for root, _, names in os.walk(local) for n in names]
    if not any(is_sealed_file(f) for f in files):
        yield location
        return
    with _private_dir("raylab-open-") as plain:
        for f in files:
            target = os.path.join(plain, os.path.relpath(f, local))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(f, "rb") as src, open(target, "wb") as out:
                head = src.read(len(crypto.MAGIC))
                if not crypto.is_sealed(head):
                    out.write(head)
                    shutil.copyfileobj(src, out)
                    continue
                for chunk in crypto.open_chunks(_Prepended(head, src).read, os.path.basename(f), f):
                    out.write(chunk)
        yield plain


def rewrap(location: str, settings) -> bool:
    """Re-wrap a sealed file's data key(s) under `settings`' active key (`raylab keys rotate`):
    only the header (or each sealed line's header) changes, the ciphertext is kept byte for
    byte. Written to a temporary name and renamed, so a crash leaves the old or the new file,
    never half of one. False when the file is not sealed."""
    import base64
    import io

    fsys, path = filesystem(location)
    with fsys.open_input_stream(path) as f:
        data = f.read()
    if crypto.is_sealed(data):
        stream = io.BytesIO(data)
        header, packed = crypto.read_header(stream.read)
        out = crypto.pack_header(crypto.rewrap_header(header, settings, location)) + data[len(packed):]
    elif data.startswith(_SEALED_LINE.encode()) or ("\n" + _SEALED_LINE).encode() in data:
        lines = []
        for line in data.decode("utf-8").splitlines():
            if not line.startswith(_SEALED_LINE):  # a record appended while encryption was off stays as it was
                lines.append(line + "\n")
                continue
            blob = base64.b64decode(line[len(_SEALED_LINE):])
            header, packed = crypto.read_header(io.BytesIO(blob).read)
            blob = crypto.pack_header(crypto.rewrap_header(header, settings, location)) + blob[len(packed):]
            lines.append(_SEALED_LINE + base64.b64encode(blob).decode() + "\n")
        out = "".join(lines).encode()
    else:
        return False
    tmp = path + ".rewrap"
    with fsys.open_output_stream(tmp) as f:
        f.write(out)
    fsys.move(tmp, path)
    return True


def check_key(location: str) -> None:
    """Unwrap the data key of a sealed file (nothing is decrypted or written): a UserError
    naming the file and its key when this process's keys cannot open it. Nothing happens for
    a missing or plain file."""
    import io

    if not exists(location):
        return
    fsys, path = filesystem(location)
    with fsys.open_input_stream(path) as f:
        head = f.read(1 << 16)
    if crypto.is_sealed(head):
        crypto.data_key(crypto.read_header(io.BytesIO(head).read)[0], location)


def sealed_files(location: str) -> list[str]:
    """Every sealed file under a directory (local or URI), recursively."""
    from pyarrow import fs

    fsys, path = filesystem(location)
    infos = fsys.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    out = []
    for info in infos:
        if info.type != fs.FileType.File:
            continue
        with fsys.open_input_stream(info.path) as f:
            head = f.read(len(crypto.MAGIC))
            # a JSON-lines file begun before encryption was turned on has its sealed records further down
            lines = head.startswith(b"{") and ("\n" + _SEALED_LINE).encode() in head + f.read()
        if crypto.is_sealed(head) or head.startswith(_SEALED_LINE.encode()) or lines:
            out.append(info.path if "://" not in location else location.split("://", 1)[0] + "://" + info.path)
    return sorted(out)


def remove_local_tree(path: str) -> None:
    """Delete a local scratch directory (staging, caches), ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- locks


class LockTimeout(TimeoutError):
    """`exclusive_lock` could not take the lock in time; `holder` is what its holder wrote."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is held by {holder or 'an unknown process'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive_lock(path: str, timeout_s: float, poll_s: float = 0.05):
    """Hold an advisory lock on a local lock file (flock: released by the kernel when the
    holder exits or crashes, so a killed process never leaves a stale lock). Waits up to
    `timeout_s`, then raises LockTimeout naming the holder (its pid and host, which each
    holder writes into the file). Local (or shared POSIX) filesystems only."""
    import fcntl
    import socket
    import time

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(path, os.pread(fd, 200, 0).decode("utf-8", "replace").strip()) from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# ---------------------------------------------------------------- torch, figures


def save_torch(obj: Any, location: str) -> str:
    """torch.save to a file (optimizer and scheduler state, RNG state)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(location, buffer.getvalue())


def load_torch(location: str) -> Any:
    import torch

    return torch.load(io.BytesIO(read_bytes(location)), weights_only=False)


def save_figure(fig, location: str, dpi: int = 100) -> str:
    """A matplotlib figure as a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_bytes(location, buffer.getvalue())


# ---------------------------------------------------------------- Parquet


def write_table_to(table, file, compression: str = "zstd", name: str = "", settings=None) -> None:
    """Encode one Parquet file. Runs where the file is written (a Ray write task or this
    process): sealed as `name` when `settings` (the writer's crypto.Settings) are given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if settings is None:
        pq.write_table(table, file, compression=compression)
        return
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression=compression)
    for part in crypto.seal_chunks([buffer.getvalue().to_pybytes()], name, settings):
        file.write(part)


def read_table_from(file, location: str = "<parquet>"):
    """Decode one Parquet file (the counterpart of `write_table_to`), opening it first when
    it is sealed (in the read task: decrypted per file, so reads stay parallel)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    head = file.read(len(crypto.MAGIC))
    file.seek(0)
    if not crypto.is_sealed(head):
        return pq.read_table(file)
    plain = b"".join(crypto.open_chunks(file.read, file_name(location), location))
    return pq.read_table(pa.BufferReader(plain))


def _parquet_sink():
    from ray.data.datasource import BlockBasedFileDatasink

    class ParquetSink(BlockBasedFileDatasink):
        """Ray Data's file sink, each block's file encoded by `write_table_to` in the write task."""

        def __init__(self, path: str, compression: str):
            super().__init__(path, file_format="parquet")
            self.compression = compression
            # The driver's setting travels with the sink, so write tasks seal even on a
            # cluster started without $RAYLAB_ENCRYPTION.
            self.encryption = crypto.active()
            self._writing = ""

        def open_output_stream(self, path: str):
            self._writing = file_name(path)  # the file's identity, which write_block_to_file is not told
            return super().open_output_stream(path)

        def write_block_to_file(self, block, file) -> None:
            write_table_to(block.to_arrow(), file, self.compression, self._writing, self.encryption)

    return ParquetSink


def write_parquet(dataset, location: str, compression: str = "zstd") -> str:
    """A Ray Dataset as Parquet files under `location` (local path or URI)."""
    dataset.write_datasink(_parquet_sink()(location, compression))
    return location


def parquet_files(location: str) -> list[str]:
    """The Parquet files under a directory, sorted (the order a split is read in)."""
    from pyarrow import fs

    fsys, path = filesystem(location)
    infos = fsys.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == fs.FileType.File and i.path.endswith(".parquet"))


def parquet_sealed(location: str) -> bool:
    """Whether the Parquet files under `location` are sealed (judged by the first)."""
    files = parquet_files(location)
    if not files:
        return False
    fsys, _ = filesystem(location)
    with fsys.open_input_stream(files[0]) as f:
        return crypto.is_sealed(f.read(len(crypto.MAGIC)))


def read_table(location: str, columns: list[str] | None = None):
    """Every Parquet file under `location` as one pyarrow Table (files in sorted order)."""
    import pyarrow as pa

    fsys, _ = filesystem(location)
    tables = []
    for path in parquet_files(location):
        with fsys.open_input_file(path) as f:
            table = read_table_from(f, path)
        tables.append(table.select(columns) if columns else table)
    if not tables:
        raise FileNotFoundError(f"no Parquet files under {location}")
    return pa.concat_tables(tables)


def _parquet_files_datasource():
    from ray.data.datasource import FileBasedDatasource

    class ParquetFiles(FileBasedDatasource):
        """Ray Data reading Parquet files, each decoded by `read_table_from` in the read task."""

        _FILE_EXTENSIONS = ["parquet"]

        def _open_input_source(self, fsys, path: str, **open_args):
            return fsys.open_input_file(path)  # Parquet needs random access (the footer)

        def _read_stream(self, f, path: str):
            yield read_table_from(f, path)

    return ParquetFiles


def read_parquet(location: str, num_cpus: float | None = None):
    """The Parquet files under `location` as a Ray Dataset (read per file, in Ray tasks)."""
    import ray

    kwargs = {"num_cpus": num_cpus} if num_cpus else {}
    return ray.data.read_datasource(_parquet_files_datasource()(location), **kwargs)
