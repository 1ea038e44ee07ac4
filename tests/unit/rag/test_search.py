"""search() refuses, with exit-2 errors naming the directory, what is not a built index."""

from __future__ import annotations

import re

import pytest

from raylab.errors import UserError
from raylab.rag import search


def test_a_missing_index_directory_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=re.escape(str(missing)) + r" does not exist.*raylab index"):
        search(str(missing), "anything")


def test_a_directory_without_a_manifest_is_not_an_index(tmp_path):
    (tmp_path / "chunks.lance").mkdir()
    with pytest.raises(UserError, match=r"not an index raylab built \(no raylab_index\.json\)"):
        search(str(tmp_path), "anything")


def test_top_k_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="top_k must be at least 1, got 0"):
        search(str(tmp_path), "anything", top_k=0)
