"""The train.objective seam: cross-entropy through it computes exactly what loss.py did, names
resolve through the registry, and a registered objective is set up once and trains."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from raylab import models
from raylab.config import ModelConfig
from raylab.data.packing import pack_batch
from raylab.errors import UserError
from raylab.train import loss, objectives

TEXTS = ["the red widget ships today", "a blue one ships next week, maybe", "ok", "green widgets are out of stock again"]
CPU = torch.device("cpu")
CONTEXT = objectives.WorkerContext(rank=0, world_size=1, device=CPU)


@pytest.fixture(scope="module")
def tok():
    return models.build_byte_tokenizer()


def batch_of(tok, texts, seq_len=64):
    documents = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    rows = pack_batch(pa.table({"input_ids": documents, "labels": documents}), seq_len, tok.pad_token_id, "pack").to_pylist()
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids", "segment_ids", "num_tokens")}


def lora_model(tok):
    torch.manual_seed(0)
    base = models.build_tiny_model("tiny-llama", tok, seed=1)
    return models.apply_method(base, ModelConfig(name_or_path="preset:tiny-llama", method="lora", lora={"dropout": 0.0}))


def reference_sums(model, batch, attn_impl):
    """loss.forward_sums as it was before the objective seam (one function, inline)."""
    mask = loss.block_causal_mask(batch["segment_ids"], attn_impl, torch.float32)
    out = model(input_ids=batch["input_ids"].long(), attention_mask=mask, position_ids=batch["position_ids"].long(),
                use_cache=False)
    logits = out.logits[:, :-1].float()
    target = batch["labels"].long()[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=loss.IGNORE, reduction="sum")
    valid = target != loss.IGNORE
    return total, int(valid.sum()), int(((logits.argmax(-1) == target) & valid).sum())


def trained(tok, window, objective):
    lm = lora_model(tok)
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=1.0)
    out = loss.train_step(lm, opt, window, device=CPU, world_size=1, attn_impl="sdpa", max_grad_norm=None, objective=objective)
    return out, {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}


def test_cross_entropy_computes_exactly_what_loss_py_did(tok):
    lm = lora_model(tok).eval()
    batch = batch_of(tok, TEXTS)
    ce = objectives.build("cross_entropy", lm, None, CONTEXT)
    assert isinstance(ce, objectives.CrossEntropy)
    with torch.no_grad():
        total, targets, correct = reference_sums(lm, batch, "sdpa")
        through = ce.loss(batch, loss.forward(lm, batch, "sdpa"))
        sums = loss.forward_sums(lm, batch, "sdpa", objective=ce)
    assert torch.equal(through.loss, total) and through.targets == targets == loss.count_targets(batch)
    assert torch.equal(sums.loss, total) and (sums.targets, sums.correct) == (targets, correct) and correct > 0
    # one accumulated optimizer step through the objective: bit for bit the default's
    window = [batch_of(tok, TEXTS[:1]), batch_of(tok, ["hi"]), batch_of(tok, TEXTS[1:])]
    (out_default, params_default), (out_ce, params_ce) = trained(tok, window, None), trained(tok, window, ce)
    assert out_ce == out_default
    assert all(torch.equal(params_ce[n], params_default[n]) for n in params_default)


def test_an_unknown_objective_is_a_user_error_naming_the_key(tok):
    assert objectives.resolve("cross_entropy") is objectives.CrossEntropy  # control: a known name resolves
    with pytest.raises(UserError, match=r"train\.objective='nope'.*cross_entropy"):
        objectives.resolve("nope")
    with pytest.raises(UserError, match=r"train\.objective"):
        objectives.build("nope", lora_model(tok), None, CONTEXT)


def test_a_registered_objective_is_set_up_once_and_is_what_trains(tok, monkeypatch):
    calls = []

    class Doubled:
        """Twice the cross-entropy: the same direction, twice the step."""

        def setup(self, model, cfg, worker_context):
            calls.append((model, cfg, worker_context))

        def loss(self, batch, outputs):
            sums = loss.token_sums(batch, outputs)
            sums.loss = 2 * sums.loss
            return sums

    monkeypatch.setitem(objectives.OBJECTIVES, "doubled", Doubled)
    lm = lora_model(tok)
    doubled = objectives.build("doubled", lm, "the config", CONTEXT)
    assert calls == [(lm, "the config", CONTEXT)]
    window = [batch_of(tok, TEXTS)]
    (plain, _), (twice, _) = trained(tok, window, None), trained(tok, window, doubled)
    assert len(calls) == 1  # training calls loss, never setup again
    assert twice["loss"] == pytest.approx(2 * plain["loss"], rel=1e-6)
    assert twice["grad_norm"] == pytest.approx(2 * plain["grad_norm"], rel=1e-5)
    assert twice["targets"] == plain["targets"]
