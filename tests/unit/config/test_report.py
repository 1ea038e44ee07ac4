"""Error lines name the key path the user wrote: no union-member names from pydantic's
locations, and a missing key's description from the member the source's `type` picks."""

from __future__ import annotations

import pytest

from raylab import config
from raylab.errors import ConfigError

MINIMAL = {
    "version": 1,
    "data": {"sources": [{"type": "jsonl", "path": "data/train.jsonl"}]},
    "model": {"name_or_path": "preset:tiny-llama"},
}


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load_dict(MINIMAL, list(overrides))
    return info.value.problems


def only(*overrides: str) -> str:
    lines = problems(*overrides)
    assert len(lines) == 1, lines
    return lines[0]


def test_union_branch_name_is_not_in_the_path():
    """Defect a: pydantic's location of an HttpSource check is data.sources.0.http."""
    line = only("data.sources.0={type: http, url: 'https://x', page_param: p, cursor_param: c}")
    assert line.startswith("data.sources.0: give page_param or cursor_param, not both"), line
    assert "sources.0.http" not in line
    # the same for `int | tuple` (pydantic names the member: constrained-int, tuple[...])
    lines = problems("train.num_workers=0")
    assert lines and all(line.startswith("train.num_workers: ") for line in lines), lines
    assert not any("constrained-int" in line or "tuple[" in line for line in lines), lines


def test_missing_key_description_comes_from_the_chosen_source_type():
    """The description of a key missing from a source is the one of the source's `type`: an
    http source's url, not the SQL source's field of the same name."""
    line = only("data.sources.0={type: http}")
    assert line == "data.sources.0.url: missing required key; expected the endpoint; query parameters for paging are added to it"
    assert "sqlite" not in line
