"""data.val_sources: names a source that exists, and leaves one to train on (exit 2 naming the key)."""

from __future__ import annotations

import pytest

from raylab import config
from raylab.errors import UserError


def cfg(**data):
    return config.load_dict({"version": 1, "model": {"name_or_path": "preset:tiny-llama"},
                             "data": {"sources": [{"type": "jsonl", "path": "a.jsonl", "name": "train"},
                                                  {"type": "jsonl", "path": "b.jsonl"}], **data}})


def test_val_sources_must_name_a_source_and_leave_one_to_train_on():
    assert cfg(val_sources=["source1"]).data.val_sources == ["source1"]  # a default name counts
    with pytest.raises(UserError, match=r"data: val_sources names nowhere, which no source is called; sources: train, source1"):
        cfg(val_sources=["nowhere"])
    with pytest.raises(UserError, match=r"data: val_sources holds out every source"):
        cfg(val_sources=["train", "source1"])
