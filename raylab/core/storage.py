"""Run-directory I/O for local paths and URIs alike (s3://, gs://, file://), via pyarrow.

Several nodes need shared storage for the run directory, so every stage writes through
these few functions instead of `open()`.
"""

from __future__ import annotations

import os


def resolve(location: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    from pyarrow import fs

    if "://" not in location:
        return fs.LocalFileSystem(), os.path.abspath(location)
    return fs.FileSystem.from_uri(location)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def makedirs(location: str) -> None:
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)


def write_text(location: str, text: str) -> str:
    """Write `text` to a file, creating its directory; returns `location`."""
    filesystem, path = resolve(location)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))
    return location


def read_text(location: str) -> str:
    filesystem, path = resolve(location)
    with filesystem.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def exists(location: str) -> bool:
    from pyarrow import fs

    filesystem, path = resolve(location)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def sha256(location: str) -> str:
    """The file's sha256, streamed."""
    import hashlib

    filesystem, path = resolve(location)
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def reset_dir(location: str) -> None:
    """An empty directory at `location` (what was there is deleted)."""
    from pyarrow import fs

    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type != fs.FileType.NotFound:
        filesystem.delete_dir(path)
    filesystem.create_dir(path, recursive=True)


def copy_dir(local_dir: str, location: str) -> str:
    """Copy a local directory's files to `location` (local path or URI), replacing it."""
    from pyarrow import fs

    reset_dir(location)
    filesystem, path = resolve(location)
    fs.copy_files(os.path.abspath(local_dir), path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem)
    return location


def write_bytes(location: str, data: bytes) -> str:
    filesystem, path = resolve(location)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(data)
    return location


def read_bytes(location: str) -> bytes:
    filesystem, path = resolve(location)
    with filesystem.open_input_stream(path) as f:
        return f.read()


def copy_to_local(location: str, local_dir: str) -> str:
    """Copy a directory (local path or URI) into a local directory; returns `local_dir`."""
    from pyarrow import fs

    filesystem, path = resolve(location)
    os.makedirs(local_dir, exist_ok=True)
    fs.copy_files(path, os.path.abspath(local_dir), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
    return local_dir
