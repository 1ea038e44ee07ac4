"""The JSONL files a user hands the rag stage (RAFT's question/answer pairs, the retrieval
evaluation's labelled questions): each line an object, the first bad line named.

    for n, row in objects(location, "index.raft.questions", '{"question": ..., "answer": ...}',
                          "question/answer pairs"):
        ...                                # n: the line number, for the caller's own field checks
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from raylab.core import storage
from raylab.errors import UserError


def objects(location: str, key: str, shape: str, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line in order, or exit 2 naming `key`, the
    file and the line that is not JSON; a missing file and a file with no rows are exit 2 too.
    Whether a value is the right object is the caller's check, made as the lines arrive, so
    the first bad line of either kind is the one named."""
    if not storage.exists(location):
        raise UserError(f"{key}: {location} does not exist; give a JSONL file of {shape} lines")
    found = False
    for n, line in enumerate(storage.read_text(location).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{key}: {location}:{n} is not JSON ({e.msg})") from None
        found = True
        yield n, value
    if not found:
        raise UserError(f"{key}: {location} holds no {what}")
