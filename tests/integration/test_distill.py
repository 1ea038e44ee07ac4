"""`raylab optimize` with optimize.distill on a real Ray: the session's trained adapter
(`reference`, a LoRA run on the shared data-stage output) is registered as the teacher; a
one-layer student of its architecture is trained on Ray Train with the distill objective (one
worker, eight steps), its KL to the teacher falls, and it is registered as a version derived
from the teacher that reloads with plain transformers (AutoModelForCausalLM / AutoTokenizer).

The loss, masks, frozen teacher and refusals are tested on tiny objects in
tests/unit/train/test_distill.py and tests/unit/optimize/test_distill.py; here the wiring
through the train stage and the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import with_data
from raylab import config, registry
from raylab.optimize import DISTILLED_TAG, run_optimize
from registry_helpers import open_test_store, register

pytestmark = pytest.mark.integration


def test_a_student_distils_from_the_trained_model_on_ray_train_and_registers(reference, learn_data, tmp_path,
                                                                           monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_cfg, _ = reference
    store = open_test_store(tmp_path, monkeypatch)
    parent = register(store, tmp_path, 1, final=Path(teacher_cfg.output_dir) / "train" / "final")
    raw = with_data(learn_data, tmp_path / "run").model_dump(mode="json")
    raw["registry"]["model_name"] = "widgets"
    # alpha=1: the KL alone, so its fall is the objective's doing (the session's teacher, a LoRA on a random
    # base trained briefly, is a weak model: a student trained with cross-entropy too soon leaves it behind)
    raw["optimize"] = {"distill": {"student": {"num_hidden_layers": 1}, "steps": 8, "lr": 3e-3, "temperature": 2.0,
                                   "alpha": 1.0, "eval_samples": 16},
                       "measure": None}  # the measurements against the parent: tests/integration/test_prune.py
    cfg = config.load_dict(raw)

    out = run_optimize(cfg, f"widgets/{parent}", store=store)
    assert (out["version"], out["derived_from"], out["method"], out["steps"]) == (2, "widgets/1", "distill", 8)
    assert out["parameters"] < out["teacher_parameters"]
    assert out["kl_after"] < 0.5 * out["kl_before"]  # the student moved toward the teacher's distribution
    assert out["val_loss"] < out["initial_val_loss"]  # the objective itself, on the val split
    # the workers' objective at step 0 (alpha=1: T^2 * KL) is the driver's KL of the same student, measured apart
    assert out["initial_val_loss"] == pytest.approx(4 * out["kl_before"], rel=2e-2)
    # its cross-entropy moved toward the teacher's
    gap_before, gap_after = (abs(out[k] - out["teacher_eval_loss"]) for k in ("student_eval_loss_before",
                                                                              "student_eval_loss"))
    assert gap_after < gap_before

    mv = registry.get_version(store, "widgets/2")
    assert mv.tags["raylab.derived_from"] == "widgets/1" and mv.tags["raylab.derivation"] == "distill:T=2:alpha=1"
    assert mv.tags[DISTILLED_TAG] == "T=2:alpha=1" and mv.tags["raylab.parameters"] == str(out["parameters"])
    assert mv.tags["raylab.parameters_before"] == str(out["teacher_parameters"])
    assert DISTILLED_TAG not in registry.get_version(store, "widgets/1").tags  # negative control: the parent

    section = registry.card_for(store, mv)["extra_sections"]["Distillation"]
    assert "Teacher: widgets/1" in section and f"{out['parameters']:,} parameters" in section
    assert "T=2, alpha=1" in section and "8 steps" in section and f"{out['kl_after']:.4f} after" in section

    # plain transformers: the registered files are a full Llama of one layer with the teacher's tokenizer
    path = registry.fetch(store, "widgets/2")
    student = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert student.config.num_hidden_layers == 1 and len(tok) == student.config.vocab_size
    assert sum(p.numel() for p in student.parameters()) == out["parameters"]
    ids = tok("Ticket 7: the blue widget", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=ids).logits).all()
    meta = json.loads((Path(path) / "raylab_train.json").read_text())
    assert meta["distilled"]["teacher"] == "widgets/1" and meta["steps"] == 8
