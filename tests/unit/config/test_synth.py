"""The `synth:` section refuses unknown keys and inconsistent settings, naming the key."""

from __future__ import annotations

import pytest

from raylab import config


def _raw(synth: dict) -> dict:
    return {"version": 1, "output_dir": "/tmp/x", "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
            "model": {"name_or_path": "preset:tiny-llama"}, "synth": synth}


@pytest.mark.parametrize(("synth", "key"), [
    ({"endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "temprature": 1}}, "synth.endpoint.temprature"),
    ({"grounded_qa": {}}, "synth.grounded_qa.files"),
    ({"grounded_qa": {"files": ["a.md"], "prompt": "Ask about {chunk}."}}, "synth.grounded_qa.prompt"),
    ({"self_instruct": {"seeds": ["Name a colour."], "output_prompt": "Do it."}}, "synth.self_instruct.output_prompt"),
    ({"self_instruct": {}}, "synth.self_instruct.seeds"),
    ({"filters": {"num_perm": 100, "bands": 32}}, "synth.filters.bands"),
])
def test_a_bad_synth_section_names_the_key(synth, key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load_dict(_raw(synth))


def test_the_defaults_load_and_follow_the_paper():
    cfg = config.load_dict(_raw({"self_instruct": {"seeds": ["Name a colour."]}}))
    si, f = cfg.synth.self_instruct, cfg.synth.filters
    assert (si.seed_examples, si.generated_examples, f.novelty, f.decontaminate_ngram) == (6, 2, 0.7, 13)
    assert cfg.synth.endpoint is None and cfg.governance.allow_remote is False
