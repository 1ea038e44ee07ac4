"""docs/config.md is generated from the schema; it must match what the generator writes now,
and it covers every key a shipped config uses."""

from __future__ import annotations

from pathlib import Path

import yaml

from raylab.config import docs as config_docs

REPO = Path(__file__).resolve().parents[3]


def test_config_reference_is_in_sync_with_the_schema():
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == config_docs.render(), "docs/config.md is stale: run `python -m raylab.config.docs > docs/config.md`"


def test_every_key_of_the_shipped_configs_is_documented():
    documented = {row[0].split(".(type=")[0] if ".(type=" in row[0] else row[0] for row in config_docs.rows(config_docs.RaylabConfig)}
    documented |= {row[0] for row in config_docs.rows(config_docs.RaylabConfig)}

    def keys(node, prefix=""):
        for k, v in node.items():
            path = f"{prefix}{k}"
            yield path
            if isinstance(v, dict) and not path.endswith(("search_space", "fields_map")):
                yield from keys(v, path + ".")

    for cfg_file in (REPO / "configs").glob("*.yaml"):
        raw = yaml.safe_load(cfg_file.read_text())
        for path in keys(raw):
            if path.startswith(("tune.search_space.", "data.sources")):
                continue
            assert path in documented, f"{cfg_file.name}: {path} is not in docs/config.md"
