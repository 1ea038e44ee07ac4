"""Run-directory I/O for local paths and URIs alike (s3://, gs://, file://), via pyarrow.

Several nodes need shared storage for the run directory, so every stage writes through
these few functions instead of `open()`.
"""

from __future__ import annotations

import os


def _fs(location: str):
    from pyarrow import fs

    if "://" not in location:
        return fs.LocalFileSystem(), os.path.abspath(location)
    return fs.FileSystem.from_uri(location)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def makedirs(location: str) -> None:
    filesystem, path = _fs(location)
    filesystem.create_dir(path, recursive=True)


def write_text(location: str, text: str) -> str:
    """Write `text` to a file, creating its directory; returns `location`."""
    filesystem, path = _fs(location)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))
    return location


def read_text(location: str) -> str:
    filesystem, path = _fs(location)
    with filesystem.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def exists(location: str) -> bool:
    from pyarrow import fs

    filesystem, path = _fs(location)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound
