"""`train.strategy` and `train.activation_checkpointing` as the config and the driver take them
(the sharded training itself: tests/integration/test_fsdp.py)."""

from __future__ import annotations

import pytest
import yaml

from conftest import cli_here
from manifests import fake_manifest
from raylab import config
from raylab.core import runs
from raylab.errors import ConfigError
from raylab.train import driver, pretrain

BASE = {"version": 1, "output_dir": "/tmp/unused", "data": {"sources": [{"type": "jsonl", "path": "x"}]},
        "model": {"name_or_path": "preset:tiny-llama"}}


def load(**train):
    return config.load_dict(BASE | {"train": train})


@pytest.mark.parametrize("workers", [1, [1, 3]])
def test_fsdp_with_a_single_worker_possible_is_refused_naming_the_keys(workers):
    with pytest.raises(ConfigError, match=r"train\.strategy: .*num_workers"):
        load(strategy="fsdp", num_workers=workers)
    assert load(strategy="fsdp", num_workers=[2, 3]).train.strategy == "fsdp"  # control: 2+ workers pass


def test_fsdp_with_one_worker_exits_2_from_the_cli(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(BASE | {"train": {"strategy": "fsdp"}}))
    done = cli_here("validate", str(path))
    assert done.returncode == 2 and "train.strategy" in done.stderr + done.stdout


def test_the_old_gradient_checkpointing_key_still_works():
    assert load(gradient_checkpointing=True).train.activation_checkpointing is True
    assert load(activation_checkpointing=True).train.activation_checkpointing is True
    assert load().train.activation_checkpointing is False
    with pytest.raises(ConfigError, match="one setting under two names"):
        load(gradient_checkpointing=True, activation_checkpointing=False)


def test_identity_of_a_ddp_run_is_what_it_was_before_strategy_existed():
    manifest = runs.DataManifest.model_validate(fake_manifest())
    # e827cde1e63385fb: driver.identity of this config at 475f98e, before the two keys changed
    assert driver.identity(load(gradient_checkpointing=True), manifest)["hash"] == "e827cde1e63385fb"
    assert driver.identity(load(activation_checkpointing=True), manifest)["hash"] == "e827cde1e63385fb"
    fsdp = driver.identity(load(activation_checkpointing=True, strategy="fsdp", num_workers=2), manifest)
    assert fsdp["train"]["strategy"] == "fsdp" and fsdp["hash"] != "e827cde1e63385fb"  # a changed strategy is a changed run


def test_pretraining_on_one_worker_drops_fsdp():
    cfg = config.load_dict(BASE | {"train": {"strategy": "fsdp", "num_workers": 2}, "pretrain": {"num_workers": 1}})
    assert pretrain.pretrain_config(cfg).train.strategy == "ddp"
    cfg = config.load_dict(BASE | {"train": {"strategy": "fsdp", "num_workers": 2}, "pretrain": {"num_workers": 2}})
    assert pretrain.pretrain_config(cfg).train.strategy == "fsdp"
