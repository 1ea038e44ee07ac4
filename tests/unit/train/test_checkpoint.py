"""Checkpoint integrity without Ray Train: each worker's manifest of sha256 sums, written last,
and `problems` naming what is wrong with a checkpoint a resumed run would load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raylab import config
from raylab.errors import UserError
from raylab.models import load_for_training
from raylab.train import checkpoint, driver


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A two-worker checkpoint as Ray Train merges it: rank 0's files and rank 1's in one directory."""
    cfg = config.load_dict({"version": 1, "output_dir": "/tmp/unused", "data": {"sources": [{"type": "jsonl", "path": "x"}]},
                            "model": {"name_or_path": "preset:tiny-llama", "method": "lora"}})
    model = load_for_training(cfg.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    root = tmp_path_factory.mktemp("ckpt")
    for rank in (0, 1):
        checkpoint.save(str(root / f"rank{rank}"), rank=rank, model=model, optimizer=optimizer, scheduler=scheduler,
                        state={"step": 6, "world_size": 2})
    merged = root / "merged"
    for rank in (0, 1):
        shutil.copytree(root / f"rank{rank}", merged, dirs_exist_ok=True)
    return merged


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "checkpoint"))


def test_every_file_of_every_worker_is_in_its_manifest(ckpt):
    head = json.loads((ckpt / "manifest_rank0.json").read_text())
    assert head["world_size"] == 2
    assert {"state.json", "optimizer.pt", "scheduler.pt", "rng_rank0.pt", "model/adapter_model.safetensors"} <= set(head["files"])
    assert set(json.loads((ckpt / "manifest_rank1.json").read_text())["files"]) == {"rng_rank1.pt"}
    listed = set(head["files"]) | {"rng_rank1.pt", "manifest_rank0.json", "manifest_rank1.json"}
    assert {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} == listed
    assert checkpoint.problems(str(ckpt)) == []  # complete and unchanged


def test_a_changed_file_is_named(ckpt):
    weights = ckpt / "model" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    (problem,) = checkpoint.problems(str(ckpt))
    assert problem.startswith("model/adapter_model.safetensors has sha256 ") and "not the recorded" in problem


def test_a_missing_file_of_another_rank_is_named(ckpt):
    (ckpt / "rng_rank1.pt").unlink()
    assert checkpoint.problems(str(ckpt)) == ["rng_rank1.pt is missing"]


@pytest.mark.parametrize("rank,expect", [(0, "no manifest_rank0.json (an incomplete checkpoint"),
                                         (1, "no manifest_rank1.json (rank 1 never finished its part)")])
def test_a_missing_manifest_makes_the_checkpoint_incomplete(ckpt, rank, expect):
    (ckpt / f"manifest_rank{rank}.json").unlink()
    (problem,) = checkpoint.problems(str(ckpt))
    assert problem.startswith(expect)


def test_size_thresholds_take_their_environment_override(monkeypatch):
    monkeypatch.delenv("RAYLAB_DRIVER_READ_BYTES", raising=False)
    assert driver.threshold("DRIVER_READ_BYTES") == driver.DRIVER_READ_BYTES == 64 << 20
    for name in ("DRIVER_READ_BYTES", "MATERIALIZE_BYTES", "TRAIN_CACHE_BYTES", "VAL_CACHE_BYTES"):
        monkeypatch.setenv(f"RAYLAB_{name}", "0")
        assert driver.threshold(name) == 0
    monkeypatch.setenv("RAYLAB_MATERIALIZE_BYTES", "1GiB")
    with pytest.raises(UserError, match=r"RAYLAB_MATERIALIZE_BYTES.*expected a size in bytes"):
        driver.threshold("MATERIALIZE_BYTES")


def test_listed_keeps_complete_checkpoints_in_step_order_with_their_metrics(tmp_path):
    """What the fine-tuning API lists as ftckpt_ objects: only directories with rank 0's
    manifest (one still being written is left out: the control), each with the metrics row
    logged at or before its step."""
    history = [{"step": s, "loss": 1.0 / (s + 1)} for s in (0, 4, 8, 12, 16)]
    for step, complete in ((12, True), (4, True), (16, False)):
        d = tmp_path / f"checkpoint_{step:06d}"
        d.mkdir()
        (d / checkpoint.STATE).write_text(json.dumps({"step": step, "epoch": 0, "history": history}))
        if complete:
            checkpoint.write_manifest(str(d), rank=0, world_size=1)
    (tmp_path / "metrics.jsonl").write_text("")  # not a checkpoint
    kept = checkpoint.listed(str(tmp_path))
    assert [(c["step"], c["metrics"]["step"]) for c in kept] == [(4, 4), (12, 12)]
    assert checkpoint.listed(str(tmp_path / "absent")) == []
