"""Versions: the integrity check on fetch, and references that name what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylab import registry
from raylab.errors import UserError
from registry_helpers import open_test_store, register


@pytest.fixture
def store(tmp_path, monkeypatch):
    return open_test_store(tmp_path, monkeypatch)


def test_fetch_verifies_checksums_and_refuses_tampering(store, tmp_path):
    v = register(store, tmp_path, 1)
    local = Path(registry.fetch(store, f"widgets/{v}"))
    assert (local / "adapter_model.safetensors").read_bytes() == b"\x00weights" * 100
    source = Path(store.client.get_model_version("widgets", str(v)).source)
    (source / "adapter_model.safetensors").write_bytes(b"\x00evil" * 100)
    with pytest.raises(registry.IntegrityError, match="adapter_model.safetensors .*sha256"):
        registry.fetch(store, f"widgets/{v}")
    (source / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    (source / "extra.py").write_text("import os")
    with pytest.raises(registry.IntegrityError, match="extra.py \\(not registered\\)"):
        registry.fetch(store, f"widgets/{v}")


def test_refs_name_what_is_missing(store, tmp_path):
    register(store, tmp_path, 1)
    for ref, message in [("nope/1", "no registered model 'nope'.*known: widgets"),
                         ("widgets/9", r"no version 9 \(versions: \[1\]\)"),
                         ("widgets@production", "no alias 'production'.*raylab models promote widgets"),
                         ("widgets", "expected NAME/VERSION")]:
        with pytest.raises(UserError, match=message):
            registry.get_version(store, ref)


def test_a_damaged_cache_that_a_concurrent_fetch_set_aside_first_is_replaced(store, tmp_path, monkeypatch):
    import os

    v = register(store, tmp_path, 1)
    cached = Path(registry.fetch(store, f"widgets/{v}"))
    (cached / "tokenizer.json").write_text("damaged")
    rename, raced = os.rename, []

    def rename_after_a_concurrent_fetch(src, dst):
        if Path(src) == cached and not raced:  # setting the damaged copy aside, but another
            raced.append(True)                  # fetch that found it damaged too moved it first
            rename(src, tmp_path / "set-aside")
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_after_a_concurrent_fetch)
    assert registry.fetch(store, f"widgets/{v}") == str(cached)
    assert raced and (cached / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "set-aside" / "tokenizer.json").read_text() == "damaged"
