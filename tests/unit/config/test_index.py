"""The `index:` section: defaults, its own sources, and the keys a problem names."""

from __future__ import annotations

import pytest

from raylab import config
from raylab.errors import ConfigError


def _cfg(tmp_path, **index) -> dict:
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    return {"version": 1, "output_dir": str(tmp_path / "run"),
            "data": {"sources": [{"type": "jsonl", "path": str(corpus)}]},
            "model": {"name_or_path": "preset:tiny-llama"}, **({"index": index} if index else {})}


def test_defaults_index_data_sources_with_the_bundled_minilm(tmp_path):
    ix = config.load_dict(_cfg(tmp_path)).index
    assert ix.sources is None and ix.directory is None and ix.model is None
    assert (ix.chunk_tokens, ix.overlap, ix.table, ix.ann.min_rows) == (200, 32, "chunks", 5000)


def test_own_sources_and_a_relative_directory_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ix = config.load_dict(_cfg(tmp_path, sources=[{"type": "text", "path": "handbook"}], directory="idx")).index
    assert ix.sources[0].type == "text" and ix.sources[0].path == str(tmp_path / "handbook")
    assert ix.directory == str(tmp_path / "idx")


@pytest.mark.parametrize(("index", "key"), [
    ({"overlap": 200}, "index.overlap"),
    ({"chunk_tokens": 0}, "index.chunk_tokens"),
    ({"sources": []}, "index.sources"),
    ({"chunk_size": 100}, "index.chunk_size"),
    ({"ann": {"min_rows": 10, "nlist": 4}}, "index.ann.nlist"),
])
def test_problems_name_the_key(tmp_path, index, key):
    with pytest.raises(ConfigError) as e:
        config.load_dict(_cfg(tmp_path, **index))
    assert key in str(e.value)


def test_overrides_reach_the_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml(config.load_dict(_cfg(tmp_path))))
    cfg = config.load(str(path), ["index.chunk_tokens=128", "index.ann.refine_factor=10"])
    assert cfg.index.chunk_tokens == 128 and cfg.index.ann.refine_factor == 10
