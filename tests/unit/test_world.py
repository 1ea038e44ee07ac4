"""`raylab validate` checks the world the config names (raylab/world.py): every case the
issue lists is exit 2 with a line naming its key, all reported at once; `--offline-check`
skips them; the shipped configs pass (tests/unit/config/test_shipped.py runs validate on each,
the negative control for these checks)."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_cli
from raylab import config, world

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def load(*overrides: str, cwd=REPO, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.chdir(cwd)
    # without the quickstart's corpus tokenizer, which accepts presets only: these cases name
    # other models (the tokenizer's own check is in tests/unit/config/test_loading.py)
    return config.load(QUICKSTART, ["pretrain.tokenizer=null", *overrides])


@pytest.fixture(autouse=True)
def _at_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped config's relative data paths
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_the_quickstart_has_no_problems():
    assert world.problems(load()) == []


CASES = [
    (["data.sources.0.path=missing/faq.csv"], "data.sources.0.path: ", "missing/faq.csv does not exist"),
    (["data.sources.2.path=examples/acme/faq.csv"], "data.sources.2.path: ", "is a file"),
    (["data.sources.0.type=parquet"], "data.sources.0.path: no parquet files at", "reads .parquet"),
    (["model.name_or_path=preset:tiny-nope"], "model.name_or_path: unknown preset 'tiny-nope'", "preset:tiny-llama"),
    (["model.name_or_path=/nonexistent/model"], "model.name_or_path: local directory /nonexistent/model does not exist", ""),
    (["model.name_or_path=acme-nobody/not-a-model"], "model.name_or_path: could not load 'acme-nobody/not-a-model'", ""),
    (["model.method=qlora"], "model.method=qlora", "needs a GPU"),
    (["model.attn_implementation=flash_attention_2"], "model.attn_implementation=flash_attention_2", "only on CUDA"),
    (["model.attn_implementation=flex_attention"], "model.attn_implementation=flex_attention", "no backward pass on CPU"),
    (["data.max_seq_len=100000"], "data.max_seq_len=100000 is beyond the model's 1024 positions", ""),
    (["model.lora.target_modules=[q_proj,query_key_value]"], "model.lora.target_modules: the model has no module named "
     "['query_key_value']", "q_proj"),
    (["ray.address=bogus"], "ray.address: 'bogus' is not a Ray address", ""),
    (["ray.address=ray://head:port"], "ray.address: 'ray://head:port' is not a Ray address", ""),
    (["ray.address=http://head:8265"], "ray.address: 'http://head:8265' is a dashboard / Jobs API address", ""),
    (["model.chat_template=missing.jinja"], "model.chat_template: ", "missing.jinja does not exist"),
    (["serve.api_keys_file=missing-keys.txt"], "serve.api_keys_file: ", "missing-keys.txt does not exist"),
    (["output_dir=s3://acme/runs/q1"], "pretrain: output_dir s3://acme/runs/q1 is not a filesystem path", ""),
    (["data.sources.3={type: sql, url: 'sqlite:///missing.db', query: select 1}"],
     "data.sources.3.url: the SQLite database missing.db does not exist", ""),
]


@pytest.mark.parametrize("overrides,key,detail", CASES, ids=[c[1].split(":")[0].split("=")[0] + "-" + str(i)
                                                              for i, c in enumerate(CASES)])
def test_each_problem_names_its_key(overrides, key, detail):
    found = world.problems(load(*overrides))
    assert len(found) == 1, found
    assert found[0].startswith(key.split(" ")[0]) and key in found[0] and detail in found[0], found[0]


def test_a_sweeps_target_module_choices_are_checked_too():
    found = world.problems(load("tune.search_space={model.lora.target_modules: {choice: [[q_proj, v_proj], [c_attn]]}}"))
    assert found == [f"tune.search_space.model.lora.target_modules.choice.1: the model has no module named ['c_attn']; "
                     f"its module names include {found[0].split('include ', 1)[1]}"], found
    assert world.problems(load("tune.search_space={model.lora.target_modules: {choice: [[q_proj], [all-linear]]}}")) == []


def test_a_good_address_is_not_a_problem(monkeypatch):
    for address in ("auto", "local", "127.0.0.1:6379", "ray://head-0.acme.internal:10001", "[::1]:6379"):
        assert world.address_problem(address, "ray.address") is None, address
    monkeypatch.setenv("RAY_ADDRESS", "not an address")
    assert world.problems(load()) == ["RAY_ADDRESS: 'not an address' is not a Ray address; expected auto, HOST:PORT or "
                                      "ray://HOST:PORT (e.g. ray://head:10001)"]


def test_a_directory_without_a_saved_model_and_a_type_mismatch(tmp_path):
    (tmp_path / "empty-model").mkdir()
    found = world.problems(load(f"model.name_or_path={tmp_path / 'empty-model'}"))
    assert found == [f"model.name_or_path: {tmp_path / 'empty-model'} has no config.json; expected a directory written "
                     "by save_pretrained (or raylab export), a hub id, or preset:NAME"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "docs.jsonl")
    found = world.problems(load(f"data.sources.1.path={tmp_path / 'docs.jsonl'}"))
    assert found == [f"data.sources.1.type: {tmp_path / 'docs.jsonl'} is a Parquet file, not jsonl; set type: parquet"]


def test_validate_reports_every_problem_at_once_and_offline_check_skips_them(tmp_path):
    bad = ["data.sources.0.path=missing/faq.csv", "model.method=qlora", "data.max_seq_len=100000",
           "model.lora.target_modules=[q_proj,query_key_value]", "ray.address=bogus"]
    proc = run_cli("validate", "configs/quickstart.yaml", *bad, env={"RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "configs/quickstart.yaml: 5 problems" in proc.stderr, proc.stderr
    for key in ("data.sources.0.path:", "model.method=qlora", "data.max_seq_len=100000", "model.lora.target_modules:",
                "ray.address:"):
        assert key in proc.stderr, proc.stderr
    skipped = run_cli("validate", "configs/quickstart.yaml", *bad, "--offline-check", env={"RAY_ADDRESS": ""})
    assert skipped.returncode == 0, skipped.stderr
    assert "configs/quickstart.yaml: ok" in skipped.stdout


def test_offline_sets_the_hub_offline_before_validate_and_doctor_load_anything(tmp_path):
    # A hub id that is not cached: offline, transformers must fail at once, not retry the hub.
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(json.dumps({"version": 1, "offline": True, "model": {"name_or_path": "acme-nobody/not-a-model"},
                               "data": {"sources": [{"type": "jsonl", "path": str(REPO / "examples/acme/support_chats.jsonl")}]}}))
    env = {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "RAY_ADDRESS": ""}
    for verb in ("validate", "doctor"):
        proc = run_cli(verb, str(cfg), env=env, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "model.name_or_path: could not load 'acme-nobody/not-a-model'" in proc.stderr, proc.stderr
        assert "offline" in proc.stderr.lower(), proc.stderr
