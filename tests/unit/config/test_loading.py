"""Config loading: schema, overrides, paths, secrets and error reports (no Ray)."""

from __future__ import annotations

import os
import textwrap

import pytest
import yaml

from raylab import config
from raylab.errors import ConfigError, UserError

MINIMAL = {
    "version": 1,
    "data": {"sources": [{"type": "jsonl", "path": "data/train.jsonl"}]},
    "model": {"name_or_path": "preset:tiny-llama"},
}


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_and_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load_dict(MINIMAL, stem="job")
    assert cfg.output_dir == str(tmp_path / "runs" / "job")
    assert cfg.run_name == "job"
    assert cfg.data.sources[0].path == str(tmp_path / "data" / "train.jsonl")
    assert cfg.model.lora.target_modules == ["all-linear"]
    assert cfg.tune is None


def test_three_kinds_of_problem_reported_together(tmp_path):
    path = write(tmp_path, """\
        version: 1
        data:
          sources: [{type: jsonl, path: x.jsonl}]
        model: {method: lora}
        train:
          lrr: 0.001
          epochs: three
        """)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    problems = info.value.problems
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "train.lrr: unknown key (did you mean train.lr?)" in text
    assert "train.epochs:" in text and "'three'" in text and "integer" in text
    assert "model.name_or_path: missing required key" in text


def test_misplaced_key_suggests_its_section():
    raw = {**MINIMAL, "model": {"name_or_path": "preset:tiny-llama", "lr": 1e-3}}
    with pytest.raises(ConfigError, match=r"model\.lr: unknown key \(did you mean train\.lr\?\)"):
        config.load_dict(raw)


def test_unknown_key_inside_a_source_names_the_list_index():
    raw = {**MINIMAL, "data": {"sources": [{"type": "jsonl", "path": "a", "pth": "b"}]}}
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.pth: unknown key \(did you mean data\.sources\.0\.path\?\)"):
        config.load_dict(raw)


def test_override_float_is_coerced_by_schema():
    cfg = config.load_dict(MINIMAL, ["train.lr=1e-4", "train.weight_decay=0"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.weight_decay, float)


def test_override_list_and_list_item(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load_dict(MINIMAL, ["model.lora.target_modules=[q_proj,v_proj]", "data.sources.0.path=other.jsonl"])
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.sources[0].path == str(tmp_path / "other.jsonl")


def test_override_appends_a_list_item_and_creates_sections():
    cfg = config.load_dict(
        MINIMAL,
        ["data.sources.1={type: sql, url: 'sqlite:///x.db', query: 'select 1'}", "registry.gates.max_val_loss=2.5"],
    )
    assert cfg.data.sources[1].type == "sql"
    assert cfg.registry.gates.max_val_loss == 2.5


def test_override_null():
    raw = {**MINIMAL, "train": {"max_steps": 10}, "tune": {"search_space": {"train.lr": {"uniform": [0.1, 0.2]}}}}
    cfg = config.load_dict(raw, ["train.max_steps=null", "tune=null"])
    assert cfg.train.max_steps is None
    assert cfg.tune is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr", "expected KEY=VALUE"),
        ("train..lr=1", "expected KEY=VALUE"),
        ("data.sources.5.path=x", "has 1 items; index 5 is out of range"),
        ("data.sources.x.path=x", "is a list; address its items by index"),
        ("model.name_or_path.sub=1", "is a value, not a section"),
        ("train.lr=[1, 2", "not valid YAML"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message):
        config.load_dict(MINIMAL, [override])


def test_override_wrong_type_is_a_config_problem():
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*got 'many'"):
        config.load_dict(MINIMAL, ["train.batch_size=many"])


def test_secrets_stay_references(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_URL", "postgresql://user:hunter2@db/corp")
    raw = {**MINIMAL, "output_dir": str(tmp_path / "run")}
    raw["data"] = {"sources": [{"type": "sql", "url": "${env:PG_URL}", "query": "select text from docs"}]}
    cfg = config.load_dict(raw)
    assert cfg.data.sources[0].url == "${env:PG_URL}"
    assert config.env_refs(cfg) == [("data.sources.0.url", "PG_URL")]
    assert config.expand_env(cfg.data.sources[0].url, "data.sources.0.url").endswith("@db/corp")
    written = config.write_resolved(cfg)
    text = open(written).read()
    assert "${env:PG_URL}" in text and "hunter2" not in text
    again = config.load(written)  # the resolved config is re-runnable as is
    assert again.model_dump() == cfg.model_dump()


def test_missing_secret_names_key_and_variable(monkeypatch):
    monkeypatch.delenv("NOPE_TOKEN", raising=False)
    with pytest.raises(UserError, match=r"data\.sources\.0\.url references \$\{env:NOPE_TOKEN\}.*not set"):
        config.expand_env("${env:NOPE_TOKEN}", "data.sources.0.url")


def test_malformed_secret_reference():
    raw = {**MINIMAL, "data": {"sources": [{"type": "http", "url": "https://x/${ENV:TOKEN}"}]}}
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.url: malformed reference"):
        config.load_dict(raw)


def test_uris_and_hub_ids_are_not_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-model").mkdir()
    raw = {**MINIMAL, "output_dir": "s3://bucket/runs/a", "model": {"name_or_path": "org/model"}}
    cfg = config.load_dict(raw)
    assert cfg.output_dir == "s3://bucket/runs/a" and cfg.run_name == "a"
    assert cfg.model.name_or_path == "org/model"
    cfg = config.load_dict(raw, ["model.name_or_path=local-model"])
    assert cfg.model.name_or_path == str(tmp_path / "local-model")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the config is empty"),
        ("# only a comment\n", "the config is empty"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("version: 1\ndata: [unclosed\n", r"job\.yaml:\d+:\d+: YAML syntax error"),
    ],
)
def test_unreadable_files(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        config.load(write(tmp_path, text))


def test_yaml_error_reports_its_line(tmp_path):
    path = write(tmp_path, "version: 1\nmodel:\n  name_or_path: x\n   bad: indent\n")
    with pytest.raises(UserError, match=r"job\.yaml:4:"):
        config.load(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        config.load(tmp_path / "absent.yaml")
    with pytest.raises(UserError, match="is a directory"):
        config.load(tmp_path)


def test_version_and_unknown_section():
    with pytest.raises(ConfigError, match="version: Input should be 1"):
        config.load_dict({**MINIMAL, "version": 2})
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean train\?\)"):
        config.load_dict({**MINIMAL, "trian": {}})


def test_search_space_checked_against_schema():
    raw = {**MINIMAL, "tune": {"search_space": {"train.lr": {"loguniform": [1e-3, 1e-5]}}}}
    with pytest.raises(ConfigError, match=r"tune\.search_space\.train\.lr: loguniform range .* is empty"):
        config.load_dict(raw)
    raw["tune"]["search_space"] = {"train.nope": {"choice": [1, 2]}}
    with pytest.raises(ConfigError, match=r"unknown config keys \['train\.nope'\]"):
        config.load_dict(raw)
    raw["tune"]["search_space"] = {"train.lr": {"choice": []}}
    with pytest.raises(ConfigError, match="choice needs at least one value"):
        config.load_dict(raw)


def test_serve_consistency():
    with pytest.raises(ConfigError, match="max_ongoing_requests .* must be above"):
        config.load_dict(MINIMAL, ["serve.max_ongoing_requests=2", "serve.autoscaling.target_ongoing_requests=2"])
    with pytest.raises(ConfigError, match=r"min_replicas \(3\) > max_replicas \(1\)"):
        config.load_dict(MINIMAL, ["serve.autoscaling.min_replicas=3"])


def test_to_yaml_round_trip(tmp_path):
    cfg = config.load_dict({**MINIMAL, "output_dir": str(tmp_path / "r")}, ["train.lr=3e-4"])
    raw = yaml.safe_load(config.to_yaml(cfg))
    assert raw["train"]["lr"] == pytest.approx(3e-4)
    assert config.load_dict(raw).model_dump() == cfg.model_dump()


def test_write_resolved_to_a_file_uri(tmp_path):
    cfg = config.load_dict({**MINIMAL, "output_dir": f"file://{tmp_path}/uri-run"})
    where = config.write_resolved(cfg)
    assert where.startswith("file://")
    assert os.path.exists(tmp_path / "uri-run" / "config.resolved.yaml")


def nested(depth: int):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [33, 600, 3000])
def test_configs_nested_too_deep_are_a_user_error_not_a_recursion_error(tmp_path, depth):
    # The YAML parser, the deep copy, pydantic and the report all recurse: without the check at
    # the entrance, a few hundred levels end in a RecursionError traceback (found by test_fuzz).
    path = write(tmp_path, "version: 1\nmodel: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(UserError, match="nested more than 32 levels deep"):
        config.load(path)
    with pytest.raises(UserError, match="nested more than 32 levels deep"):
        config.load_dict({**MINIMAL, "model": nested(depth)})
    with pytest.raises(UserError, match=r"override model: value is nested too deep|nested more than 32"):
        config.load_dict(MINIMAL, ["model=" + "[" * depth + "]" * depth])


def test_nesting_up_to_the_limit_reaches_the_schema():
    # The negative control: 31 levels under `model` pass the depth check and get the schema's answer.
    with pytest.raises(ConfigError, match="model: Input should be a valid dictionary"):
        config.load_dict({**MINIMAL, "model": nested(31)})
    assert config.loading.too_deep({"a": nested(31)}) is None
    assert config.loading.too_deep({"a": nested(33)}) == "a" + ".0" * 32
    with pytest.raises(UserError, match=r"a\.a\.a.*: nested more than 32 levels deep"):
        config.load_dict(MINIMAL, [".".join(["a"] * 40) + "=1"])  # a long override key nests too


def test_corpus_tokenizer_needs_a_preset_base():
    raw = {**MINIMAL, "pretrain": {"tokenizer": {"vocab_size": 1000}}}
    cfg = config.load_dict(raw)  # MINIMAL's model is a preset
    assert cfg.pretrain.tokenizer.vocab_size == 1000 and cfg.pretrain.tokenizer.min_frequency == 2
    with pytest.raises(ConfigError, match=r"pretrain\.tokenizer: a tokenizer trained on the corpus needs a base built "
                                          r"from scratch, but model\.name_or_path is 'org/real-model'"):
        config.load_dict({**raw, "model": {"name_or_path": "org/real-model"}})
    with pytest.raises(ConfigError, match=r"pretrain\.tokenizer\.vocab_size: .*greater than or equal to 300"):
        config.load_dict({**raw, "pretrain": {"tokenizer": {"vocab_size": 10}}})
    assert config.load_dict({**raw, "model": {"name_or_path": "org/real-model"}, "pretrain": {}}).pretrain.tokenizer is None
