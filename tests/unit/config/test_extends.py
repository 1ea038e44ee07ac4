"""`extends: OTHER.yaml`: a config states only what differs from a base config."""

from __future__ import annotations

import pytest

from conftest import REPO
from raylab import config
from raylab.config.loading import read_extended, read_yaml
from raylab.errors import UserError


def test_governed_quickstart_is_the_quickstart_plus_governance():
    base = config.load(REPO / "configs" / "quickstart.yaml").model_dump(mode="json")
    governed = config.load(REPO / "configs" / "quickstart-governed.yaml").model_dump(mode="json")
    differs = {k for k in base if base[k] != governed[k]}
    assert differs == {"output_dir", "registry", "governance"}
    assert governed["governance"]["encryption"]["enabled"] and not base["governance"]["encryption"]["enabled"]
    # mappings merge key by key: the registry keeps the quickstart's gates, only the name changes
    assert governed["registry"]["gates"] == base["registry"]["gates"]
    assert governed["registry"]["model_name"] == "acme-assistant-governed" != base["registry"]["model_name"]
    assert "extends" not in read_extended(REPO / "configs" / "quickstart-governed.yaml")
    assert read_yaml(REPO / "configs" / "quickstart-governed.yaml")["extends"] == "quickstart.yaml"  # control


def test_lists_replace_and_bad_extends_name_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("version: 1\ndata: {sources: [{type: jsonl, path: a.jsonl}], seed: 1}\n")
    (tmp_path / "job.yaml").write_text("extends: base.yaml\ndata: {sources: [{type: jsonl, path: b.jsonl}]}\n")
    raw = read_extended(tmp_path / "job.yaml")
    assert raw["data"] == {"sources": [{"type": "jsonl", "path": "b.jsonl"}], "seed": 1}
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nversion: 1\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match=r"a\.yaml extends this file again"):
        read_extended(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: [base.yaml]\n")
    with pytest.raises(UserError, match=r"c\.yaml: extends: expected the path"):
        read_extended(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(UserError, match="config file not found: .*missing.yaml"):
        read_extended(tmp_path / "d.yaml")
