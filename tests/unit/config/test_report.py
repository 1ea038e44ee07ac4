"""Error lines of cross-field checks (`model_validator`s raising `types.invalid`): the path
is the key the user wrote, given once, with no union-branch names and no section dump."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from raylab import config
from raylab.config import report
from raylab.config.types import Section, invalid
from raylab.errors import ConfigError

MINIMAL = {
    "version": 1,
    "data": {"sources": [{"type": "jsonl", "path": "data/train.jsonl"}]},
    "model": {"name_or_path": "preset:tiny-llama"},
}
DUMP = re.compile(r"\{'|\(dict\)")  # how a section's mapping looked when it was printed as `got`


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load_dict(MINIMAL, list(overrides))
    return info.value.problems


def only(*overrides: str) -> str:
    lines = problems(*overrides)
    assert len(lines) == 1, lines
    return lines[0]


# (overrides, the whole line). A check about one key reports at that key; a rule between
# keys reports at the section holding them and names each key with its value.
CROSS_FIELD = [
    (["data.sources.0={type: http, url: 'https://x', page_param: p, cursor_param: c, next_cursor_path: n}"],
     "data.sources.0: give page_param or cursor_param, not both (page_param is 'p', cursor_param is 'c')"),
    (["data.sources.0={type: http, url: 'https://x', cursor_param: c}"],
     "data.sources.0.next_cursor_path: required with cursor_param: the dotted path to the next cursor in a response"),
    (["model.lora.modules_to_save=[embed_tokens]"],
     "model.lora.modules_to_save: only used by method: hybrid (method is lora)"),
    (["model.method=hybrid"],
     "model.lora.modules_to_save: empty, but method: hybrid trains these modules in full; "
     "name at least one (e.g. [embed_tokens])"),
    (["train.num_workers=[4, 2]"], "train.num_workers: [min, max] is [4, 2]: min must not exceed max"),
    (["serve.autoscaling.min_replicas=3"], "serve.autoscaling: min_replicas (3) > max_replicas (1)"),
    (["serve.max_ongoing_requests=2", "serve.autoscaling.target_ongoing_requests=2"],
     "serve: max_ongoing_requests (2) must be above autoscaling.target_ongoing_requests (2.0)"),
    (["data.validation.min_chars=10", "data.validation.max_chars=5"], "data.validation: min_chars (10) > max_chars (5)"),
    (["data.validation.deny_regex=['(']"],
     "data.validation.deny_regex: '(' is not a valid regular expression: missing ), unterminated subpattern at position 0"),
    (["data.dedup.bands=10"], "data.dedup: num_perm (64) must be a multiple of bands (10)"),
    (["data.pii.types=[NOPE]"], "data.pii.types: unknown detectors ['NOPE']; expected some of "),
    (["registry.gates.golden=[{prompt: hi}]"],
     "registry.gates.golden.0: give contains, regex, exact and/or json_schema: what the answer must have"),
    (["registry.gates.golden=[{prompt: hi, regex: '('}]"],
     "registry.gates.golden.0.regex: '(' does not compile: missing ), unterminated subpattern at position 0"),
    (["tune={search_space: {train.lr: {choice: [1], uniform: [1, 2]}}}"],
     "tune.search_space.train.lr: give exactly one of loguniform, uniform, randint, choice (got ['uniform', 'choice'])"),
    (["tune={search_space: {train.nope: {choice: [1]}}}"], "tune.search_space: unknown config keys ['train.nope']"),
    (["tune={search_space: {train.lr: {choice: [1]}}, points_to_evaluate: [{train.x: 1}]}"],
     "tune.points_to_evaluate.0: give exactly the search_space keys ['train.lr'], got ['train.x']"),
]


@pytest.mark.parametrize("overrides, expected", CROSS_FIELD, ids=lambda v: v if isinstance(v, str) else None)
def test_cross_field_line(overrides, expected):
    line = only(*overrides)
    assert line.startswith(expected), line
    path, _, message = line.partition(": ")
    assert not DUMP.search(line), line  # defect c: the section's mapping is not printed
    assert "(top level)" not in line and ".http" not in path  # no placeholder, no union-branch name
    key = path.rsplit(".", 1)[-1]
    if not key.isdigit():  # defect b: the key is the path, not repeated in the message
        assert not re.search(rf"\b{re.escape(key)}\b", message), line


def test_union_branch_name_is_not_in_the_path():
    """Defect a: pydantic's location of an HttpSource check is data.sources.0.http."""
    line = only("data.sources.0={type: http, url: 'https://x', page_param: p, cursor_param: c}")
    assert line.startswith("data.sources.0: give page_param or cursor_param, not both"), line
    assert "sources.0.http" not in line
    # the same for `int | tuple` (pydantic names the member: constrained-int, tuple[...])
    lines = problems("train.num_workers=0")
    assert lines and all(line.startswith("train.num_workers: ") for line in lines), lines
    assert not any("constrained-int" in line or "tuple[" in line for line in lines), lines


def test_the_key_appears_once():
    """Defect b: `model: model.lora.modules_to_save is only used ...` named the section twice."""
    line = only("model.lora.modules_to_save=[embed_tokens]")
    assert line == "model.lora.modules_to_save: only used by method: hybrid (method is lora)"
    assert line.count("modules_to_save") == 1 and line.count("model.") == 1
    line = only("train.num_workers=[4, 2]")
    assert line.count("num_workers") == 1 and line.count("train") == 1, line


def test_no_section_dump_after_got():
    """Defect c: a section check's input is the section's mapping; it is not printed. A key's
    wrong value still is (the negative control: the `got` logic still runs)."""
    for line in [only("model.lora.modules_to_save=[embed_tokens]"), only("data.dedup.bands=10"),
                 only("data.sources.0={type: xml, path: a}")]:
        assert "got {" not in line and not DUMP.search(line), line
    assert only("train.batch_size=many").endswith("; got 'many' (str)")
    assert only("model.name_or_path={a: 1}").endswith("; got {'a': 1} (dict)")  # a value, not a section


def test_missing_key_description_comes_from_the_chosen_source_type():
    """The description of a key missing from a source is the one of the source's `type`: an
    http source's url, not the SQL source's field of the same name."""
    line = only("data.sources.0={type: http}")
    assert line == (
        "data.sources.0.url: missing required key; expected the endpoint; query parameters for paging are added "
        "to it; may hold ${env:NAME} (a token, say)")
    assert "sqlite" not in line


# The mechanism on a throwaway schema: `at` is joined onto the section's path only when it
# names a key of that section; otherwise it stays in the message (nothing is lost).
class _Inner(Section):
    low: int = Field(0, description="low")
    high: int = Field(1, description="high")
    at: str = Field("", description="where the check reports")

    @model_validator(mode="after")
    def _order(self) -> _Inner:
        if self.low > self.high:
            raise invalid(f"{self.low} is above high ({self.high})", at=self.at)
        return self


class _Outer(BaseModel):
    inner: list[_Inner] = Field(description="items")


@pytest.mark.parametrize("at, expected", [
    ("low", "inner.0.low: 5 is above high (1)"),
    ("", "inner.0: 5 is above high (1)"),
    ("nope", "inner.0: nope: 5 is above high (1)"),  # not a key of _Inner: not made a path
])
def test_invalid_at_joins_only_real_keys(at, expected):
    raw = {"inner": [{"low": 5, "at": at}]}
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate(raw)
    assert report.problems(_Outer, info.value, raw) == [expected]
