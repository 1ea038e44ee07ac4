"""`raylab optimize` with optimize.prune on a real Ray: a tiny Llama registered as a version is
pruned (half its key/value groups, 30 % of its MLP channels), recovered for a few steps on Ray
Train on the shared data-stage output (`learn_data`), and registered as a version derived from
it whose parameter count, config, weights, card and losses say what was done, measured against
its parent on the val split (eval loss, ROUGE-L) with this config's optimize gates carried onto it.

One worker, four steps: the pruning itself is tested on tiny objects in
tests/unit/optimize/test_prune.py; here the wiring through the train stage and the registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import with_data
from raylab import config, models, registry
from raylab.optimize import PRUNED_TAG, run_optimize
from registry_helpers import open_test_store, register

pytestmark = pytest.mark.integration

HIDDEN, HEAD_DIM, LAYERS = 64, 16, 2  # the tiny-llama preset: 4 heads in 2 key/value groups, 128 MLP channels


def test_a_pruned_version_is_recovered_on_ray_train_and_registered(learn_data, tmp_path, monkeypatch):
    parent_dir = tmp_path / "parent"  # the preset the shared shards were tokenized for, as a full model
    shutil.copytree(models.resolve("preset:tiny-llama"), parent_dir)
    before = sum(t.numel() for t in load_file(str(parent_dir / "model.safetensors")).values())
    store = open_test_store(tmp_path, monkeypatch)
    parent = register(store, tmp_path, 1, final=parent_dir)
    raw = with_data(learn_data, tmp_path / "run").model_dump(mode="json")
    raw["registry"]["model_name"] = "widgets"
    raw["optimize"] = {"prune": {"heads": 0.5, "mlp_channels": 0.3, "calibration_samples": 8, "recovery_steps": 4},
                       # measured against the parent, kept short (memory: tests/unit/optimize/test_report.py)
                       "measure": {"requests": 1, "max_new_tokens": 2, "memory": False}}
    held_out = tmp_path / "held_out.jsonl"  # the shared corpus's val split holds no instruction records
    held_out.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in (
        ("Where do widgets ship from?", "Widgets ship from the warehouse."), ("Who pays returns?", "The buyer pays."))))
    raw["eval"].update(max_samples=2, max_new_tokens=4, held_out=str(held_out))
    raw["registry"]["gates"] = {"max_quality_drop": 0.5, "min_speedup": 0.01}  # carried onto the derived version
    cfg = config.load_dict(raw)

    out = run_optimize(cfg, f"widgets/{parent}", store=store)
    assert (out["version"], out["derived_from"], out["method"]) == (2, "widgets/1", "prune")
    # 1 of 2 groups = 2 of 4 heads; round(0.3 * 128) = 38 channels; per layer q+o, k+v, gate+up+down
    assert (out["heads_removed"], out["kv_groups_removed"], out["channels_removed"]) == (2, 1, 38)
    removed = LAYERS * (2 * HIDDEN * 2 * HEAD_DIM + 2 * HIDDEN * 1 * HEAD_DIM + 3 * HIDDEN * 38)
    assert (out["parameters_before"], out["parameters"]) == (before, before - removed)
    assert out["recovery_steps"] == 4
    assert out["recovery_val_loss"] < out["pruned_val_loss"]  # the recovery fine-tune learned something

    mv = registry.get_version(store, "widgets/2")
    assert mv.tags["raylab.derived_from"] == "widgets/1" and mv.tags["raylab.derivation"] == "prune:heads=0.5:mlp_channels=0.3"
    assert mv.tags[PRUNED_TAG] == "heads=0.5:mlp_channels=0.3" and mv.tags["raylab.parameters"] == str(before - removed)
    assert PRUNED_TAG not in registry.get_version(store, "widgets/1").tags  # negative control: the parent is untouched

    inf = models.load("widgets/2", store=store)  # verified checksums; a full model of the smaller shape
    c = inf.model.config
    assert inf.kind == "full" and (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (
        2, 1, 90, HEAD_DIM)
    assert sum(t.numel() for t in inf.model.parameters()) == before - removed
    with torch.no_grad():
        assert torch.isfinite(inf.model(input_ids=torch.tensor([[5, 60, 70, 80]])).logits).all()
    # the registered weights are the recovered ones, not the pruned starting point (which has the same shapes)
    (base,) = (Path(cfg.output_dir) / "optimize").glob("prune-widgets-1-*/base")
    pruned = load_file(str(base / "model.safetensors"))
    recovered = load_file(str(Path(inf.path) / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert pruned[key].shape == recovered[key].shape == (HIDDEN, 90) and not torch.equal(pruned[key], recovered[key])

    # measured against the parent with the data stage's val split: eval loss and ROUGE-L as well (report.py)
    measured = out["measurements"]
    assert measured["val"].rstrip("/").endswith("val") and measured["rouge_items"] == 2
    for side in ("parent", "result"):
        assert measured[side]["eval_loss"] > 0 and 0 <= measured[side]["rouge_l"] <= 1
    assert measured["result"]["parameters"] == before - removed and measured["parent"]["parameters"] == before
    assert float(mv.tags["raylab.measure.quality_drop"]) == pytest.approx(measured["ratios"]["quality_drop"], rel=1e-4)
    gates = registry.get_version(store, "widgets/2").tags["raylab.gates"]
    assert '"max_quality_drop":0.5' in gates and '"min_speedup":0.01' in gates
    assert "| eval loss (val split) |" in (Path(cfg.output_dir) / "optimize" / "report.md").read_text()

    section = registry.card_for(store, mv)["extra_sections"]["Pruning"]
    assert "Attention heads removed per layer: 2 of 4 (1 of 2 key/value groups)" in section
    assert "MLP channels removed per layer: 38 of 128" in section and f"{before:,} before" in section
    assert "Wanda" in section and "4 steps" in section and f"{out['recovery_val_loss']:.4f} after" in section
