"""`eval.bias_probes` and `registry.gates.max_bias_gap`: the shipped sets validate, a user's
own set extends or replaces them, and every bad probe config is one line naming its key
(exit 2 from the CLI, before anything loads)."""

from __future__ import annotations

import pytest
import yaml

from raylab import config
from raylab.cli import main
from raylab.config.bias_defaults import DEFAULT_SETS
from raylab.errors import ConfigError

MINIMAL = {
    "version": 1,
    "data": {"sources": [{"type": "jsonl", "path": "data/train.jsonl"}]},
    "model": {"name_or_path": "preset:tiny-llama"},
}
OWN = ("eval.bias_probes.probes=[{name: roles, slot: person, groups: {female: [woman], male: [man]}, "
       "templates: [{text: 'The {person} is a', continuation: ' pilot'}]}]")


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load_dict(MINIMAL, list(overrides))
    return info.value.problems


def test_the_shipped_sets_validate_and_a_users_set_extends_or_replaces_them():
    on = config.load_dict(MINIMAL, ["eval.bias_probes={}"]).eval.bias_probes
    assert [s.name for s in on.sets()] == ["gender", "age", "nationality"] == list(DEFAULT_SETS)
    assert all(len(s.groups) >= 2 and s.templates for s in on.sets())
    assert config.load_dict(MINIMAL).eval.bias_probes is None  # off unless asked for
    mine = config.load_dict(MINIMAL, ["eval.bias_probes.defaults=[age]", OWN]).eval.bias_probes
    assert [s.name for s in mine.sets()] == ["age", "roles"]
    assert mine.sets()[1].probe_name(0) == "roles/0"
    only = config.load_dict(MINIMAL, ["eval.bias_probes.defaults=[]", OWN]).eval.bias_probes
    assert [s.name for s in only.sets()] == ["roles"]
    assert config.load_dict(MINIMAL, ["registry.gates.max_bias_gap=0.3"]).registry.gates.max_bias_gap == 0.3


@pytest.mark.parametrize(("override", "line"), [
    ("eval.bias_probes.probes=[{name: r, groups: {a: [x], b: [y]}, templates: [{text: 'The person is', "
     "continuation: ' kind'}]}]", "eval.bias_probes.probes.0.templates.0.text: has no {term} slot ('The person is')"),
    ("eval.bias_probes.probes=[{name: r, groups: {a: [x], b: []}, templates: [{text: '{term} is', continuation: ' kind'}]}]",
     "eval.bias_probes.probes.0.groups.b: has no terms"),
    ("eval.bias_probes.probes=[{name: r, groups: {a: [x]}, templates: [{text: '{term} is', continuation: ' kind'}]}]",
     "eval.bias_probes.probes.0.groups: a gap needs at least two groups"),
    ("eval.bias_probes.defaults=[religion]", "eval.bias_probes.defaults.0:"),
    ("eval.bias_probes.threshold=-0.1", "eval.bias_probes.threshold:"),
    ("registry.gates.max_bias_gap=-1", "registry.gates.max_bias_gap:"),
    ("eval.bias_probes={defaults: []}", "eval.bias_probes: defaults is [] and no probes are given"),
    ("eval.bias_probes.probes=[{name: gender, groups: {a: [x], b: [y]}, templates: [{text: '{term}', continuation: ' k'}]}]",
     "eval.bias_probes.probes.0.name: 'gender' is already a probe set"),
])
def test_a_bad_probe_config_is_one_line_naming_its_key(override, line):
    found = problems(override)
    assert len(found) == 1 and found[0].startswith(line), found


def test_the_cli_exits_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "eval": {"bias_probes": {"defaults": ["religion"]}}}))
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "eval.bias_probes.defaults.0" in err and "Traceback" not in err, err
    good = tmp_path / "good.yaml"  # negative control: the same file with a shipped set gets past the config
    good.write_text(yaml.safe_dump({**MINIMAL, "output_dir": str(tmp_path / "out"),
                                    "eval": {"bias_probes": {"defaults": ["age"]}}}))
    assert main(["eval", str(good)]) == 2
    err = capsys.readouterr().err
    assert "bias_probes" not in err and "no trained model" in err, err
