"""The `distill` objective (raylab/train/distill.py) on tiny logits and tiny models, no Ray: the
loss equals a value computed by hand; alpha=0 is the cross-entropy objective exactly; alpha=1
with the teacher's own logits is zero; only target tokens count (a change at a masked position
changes nothing, one at a target does); the teacher loaded by `setup` is frozen, so a backward
pass reaches the student's parameters and none of the teacher's."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from raylab import config, models
from raylab.core import runs
from raylab.data.packing import pack_batch
from raylab.errors import UserError
from raylab.train import distill, loss, objectives

IGN = loss.IGNORE
CPU = torch.device("cpu")
CONTEXT = objectives.WorkerContext(rank=0, world_size=1, device=CPU)
TEXTS = ["the red widget ships today", "a blue one ships next week, maybe", "ok", "green widgets are out of stock"]


def log_softmax(row: list[float], t: float = 1.0) -> list[float]:
    scaled = [x / t for x in row]
    top = max(scaled)
    norm = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - norm for x in scaled]


def test_the_loss_equals_a_hand_computed_value_on_tiny_logits():
    # one row of 4 tokens, 3-word vocabulary; labels predicted from positions 0 and 2 (position 1's is masked)
    student = [[1.0, 2.0, 0.5], [0.3, 0.1, 0.2], [-1.0, 0.0, 2.0], [9.0, 9.0, 9.0]]
    teacher = [[2.0, 1.0, 0.0], [5.0, -5.0, 0.0], [0.0, 0.5, 1.0], [1.0, 1.0, 1.0]]
    labels = [IGN, 2, IGN, 1]
    t, alpha = 2.0, 0.3
    expected = 0.0
    for pos, target in ((0, 2), (2, 1)):
        ce = -log_softmax(student[pos])[target]
        ls, lt = log_softmax(student[pos], t), log_softmax(teacher[pos], t)
        kl = sum(math.exp(b) * (b - a) for a, b in zip(ls, lt, strict=True))
        expected += alpha * t * t * kl + (1 - alpha) * ce
    batch = {"labels": torch.tensor([labels])}
    sums = distill.distill_sums(batch, torch.tensor([student]), torch.tensor([teacher]), t, alpha)
    assert sums.targets == 2
    assert float(sums.loss) == pytest.approx(expected, rel=1e-6)
    # negative control: the same logits under another temperature give another value
    assert float(distill.distill_sums(batch, torch.tensor([student]), torch.tensor([teacher]), 1.0, alpha).loss) \
        != pytest.approx(expected, rel=1e-3)


@pytest.fixture(scope="module")
def tok():
    return models.build_byte_tokenizer()


def packed(tok, seq_len=48):
    documents = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    rows = pack_batch(pa.table({"input_ids": documents, "labels": documents}), seq_len, tok.pad_token_id,
                      "pack").to_pylist()
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids", "segment_ids")}


def logits_of(model, batch):
    return loss.forward(model, batch, loss.attn_impl_of(model)).logits


def test_alpha_0_is_cross_entropy_exactly_and_alpha_1_with_the_teachers_logits_is_zero(tok):
    batch = packed(tok)
    assert (batch["segment_ids"].max(dim=1).values > 1).any()  # packed rows: several documents in a row
    student, teacher = (models.build_tiny_model("tiny-llama", tok, seed=s) for s in (1, 2))
    with torch.no_grad():
        s, t = logits_of(student, batch), logits_of(teacher, batch)
    ce = loss.token_sums(batch, distill._Logits(s))
    zero_alpha = distill.distill_sums(batch, s, t, 2.0, 0.0)
    assert torch.equal(zero_alpha.loss, ce.loss) and zero_alpha.targets == ce.targets > 0
    assert not torch.equal(distill.distill_sums(batch, s, t, 2.0, 0.5).loss, ce.loss)  # negative control
    assert float(distill.distill_sums(batch, s, s.clone(), 2.0, 1.0).loss) == pytest.approx(0.0, abs=1e-6)
    assert float(distill.distill_sums(batch, s, t, 2.0, 1.0).loss) > 1e-3  # negative control: another teacher


def test_only_target_tokens_count_in_the_kl(tok):
    batch = packed(tok)
    torch.manual_seed(0)
    width = len(tok)
    s, t = torch.randn(*batch["input_ids"].shape, width), torch.randn(*batch["input_ids"].shape, width)
    target = batch["labels"][:, 1:]
    masked = (target == IGN).nonzero()[0].tolist()  # padding or a document's first token
    kept = (target != IGN).nonzero()[0].tolist()
    base = distill.distill_sums(batch, s, t, 2.0, 1.0).loss
    for (row, pos), changes in ((masked, False), (kept, True)):
        other = t.clone()
        other[row, pos] += torch.linspace(-3, 3, width)
        assert (not torch.allclose(distill.distill_sums(batch, s, other, 2.0, 1.0).loss, base)) == changes


def test_the_objective_loads_a_frozen_teacher_and_gradients_reach_the_student_only(tmp_path, tok):
    assert objectives.resolve("distill") is distill.Distillation
    out = tmp_path / "nested"
    teacher_dir = runs.Run(str(out)).teacher
    models.build_tiny_model("tiny-llama", tok, seed=3).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    cfg = config.load_dict({
        "version": 1, "output_dir": str(out), "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
        "model": {"name_or_path": "preset:tiny-llama", "method": "full", "dtype": "float32"},
        "train": {"objective": "distill"}, "optimize": {"distill": {"student": "preset:tiny-llama", "alpha": 0.7}}})
    student = models.build_tiny_model("tiny-llama", tok, seed=4)
    student.train()
    objective = objectives.build("distill", student, cfg, CONTEXT)
    teacher = objective.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert (objective.temperature, objective.alpha) == (2.0, 0.7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    sums = loss.forward_sums(student, packed(tok), loss.attn_impl_of(student), accuracy=False, objective=objective)
    sums.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())

    # alpha=0 (a cross-entropy baseline) loads no teacher and is the cross_entropy objective's loss
    cfg.optimize.distill.alpha = 0.0
    baseline = objectives.build("distill", student, cfg, CONTEXT)
    batch = packed(tok)
    with torch.no_grad():
        outputs = loss.forward(student, batch, loss.attn_impl_of(student))
    assert baseline.teacher is None and torch.equal(baseline.loss(batch, outputs).loss,
                                                    loss.token_sums(batch, outputs).loss)

    # without a teacher placed by `raylab optimize`, the objective says what to run instead
    cfg.output_dir = str(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"train.objective=distill: .*raylab optimize"):
        objectives.build("distill", student, cfg, CONTEXT)
