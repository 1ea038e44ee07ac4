"""The shipped per-family configs (configs/families/*.yaml, docs/models.md "Families tested")
through the pipeline, each with a tiny random-weight model of its own family (tests/families.py,
built from the family's real config class) in place of the checkpoint: `raylab validate`
(its named LoRA modules checked against that model), the train stage on the session's Ray
with LoRA on exactly the config's modules, and `raylab export --merge`, whose merged model
reloads in plain transformers as the family's own architecture.

The overrides are only what a CPU test machine needs: the model's path and offline, no GPU,
two optimizer steps of two rows (the tiny models get the configs' 1024 positions). The data
stage runs once per distinct tokenizer (a family's tokenizer class may add special tokens):
every config shares its data section, so its output serves every family that tokenizes alike.

    pytest tests/integration/test_family_configs.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from families import FAMILIES, save_tiny

from conftest import REPO, cli_here
from raylab import config

pytestmark = pytest.mark.integration

POSITIONS = 1024
CONFIGS = sorted(p.stem for p in (REPO / "configs" / "families").glob("*.yaml"))


def overrides(model_dir: Path, out: Path) -> list[str]:
    return [f"model.name_or_path={model_dir}", "offline=true", f"output_dir={out}", "train.gpus_per_worker=0",
            "train.max_steps=2", "train.batch_size=2", "train.eval_every=2", "train.log_every=1"]


def tiny(family: str, path: Path) -> None:
    save_tiny(family, path, max_position_embeddings=POSITIONS)  # room for the configs' data.max_seq_len


@pytest.fixture(scope="module")
def acme_data(tmp_path_factory, _session_ray):
    """The data stage's output for a family's model: run once per distinct tokenizer (loading a
    directory picks the family's own tokenizer class, which may add special tokens, so the
    tiny models do not all tokenize alike), then shared (every config has the same data section)."""
    from raylab import models
    from raylab.config import ModelConfig
    from raylab.data import run_data

    root, made = tmp_path_factory.mktemp("families"), {}

    def data_for(family: str, model_dir: Path) -> Path:
        key = json.dumps(models.fingerprint(models.load_tokenizer(ModelConfig(name_or_path=str(model_dir)))),
                         sort_keys=True)
        if key not in made:
            out = root / f"run{len(made)}"
            run_data(config.load(REPO / "configs" / "families" / f"{family}.yaml", overrides(model_dir, out)))
            made[key] = out / "data"
        return made[key]

    return data_for


def test_every_family_config_is_tested_and_shares_one_data_section():
    """The list below is not empty, covers the families of docs/models.md, and the shared data
    stage is sound only while every config's data section is the same (the control)."""
    assert set(CONFIGS) >= {"llama3", "qwen2.5", "qwen3", "mistral", "gemma2", "gemma3", "phi3"}
    assert set(CONFIGS) <= set(FAMILIES)
    sections = {name: config.load(REPO / "configs" / "families" / f"{name}.yaml").data.model_dump() for name in CONFIGS}
    assert len({json.dumps(s, sort_keys=True, default=str) for s in sections.values()}) == 1


@pytest.mark.parametrize("family", CONFIGS)
def test_a_family_config_validates_trains_and_merges(family, acme_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from raylab.train import run_train

    path = REPO / "configs" / "families" / f"{family}.yaml"
    tiny(family, tmp_path / "model")
    out, args = tmp_path / "run", overrides(tmp_path / "model", tmp_path / "run")
    done = cli_here("validate", str(path), *args)
    assert done.returncode == 0, done.stderr
    wrong = cli_here("validate", str(path), *args, "model.lora.target_modules=[query_key_value]")  # the control
    assert wrong.returncode == 2 and "query_key_value" in wrong.stderr, wrong.stderr

    shutil.copytree(acme_data(family, tmp_path / "model"), out / "data")
    cfg = config.load(path, args)
    meta = run_train(cfg)
    assert meta["steps"] == 2 and meta["method"] == "lora", meta
    final = out / "train" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(cfg.model.lora.target_modules), adapter["target_modules"]

    merged = tmp_path / "merged"
    done = cli_here("export", str(final), str(merged), "--merge")
    assert done.returncode == 0, done.stderr
    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    assert reloaded.config.model_type == FAMILIES[family]["config"]["model_type"]
    assert type(reloaded).__module__.startswith(f"transformers.models.{reloaded.config.model_type.split('_')[0]}")
    assert not (merged / "adapter_config.json").exists()  # merged: no adapter left
