"""The training objective without Ray: packing, accumulation, methods, schedule, checkpoints."""

from __future__ import annotations

import copy
import math

import pyarrow as pa
import pytest
import torch

from raylab import models as model
from raylab.config import ModelConfig
from raylab.data.packing import pack_batch
from raylab.train import checkpoint, loss, plan_steps

TEXTS = ["the red widget ships today", "a blue one ships next week, maybe", "ok", "green widgets are out of stock again"]


@pytest.fixture(scope="module")
def tok():
    return model.build_byte_tokenizer()


def docs(tok, texts=TEXTS):
    return [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]


def batch_of(tok, documents, seq_len=64, mode="pack"):
    table = pa.table({"input_ids": documents, "labels": documents})
    rows = pack_batch(table, seq_len, tok.pad_token_id, mode).to_pylist()
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids", "segment_ids", "num_tokens")}


def lora_model(tok, method="lora", seed=0, **lora):
    torch.manual_seed(seed)
    base = model.build_tiny_model("tiny-llama", tok, seed=1)
    cfg = ModelConfig(name_or_path="preset:tiny-llama", method=method, lora={"dropout": 0.0, **lora})
    return model.apply_method(base, cfg)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_packed_loss_equals_each_document_alone(tok, impl, preset):
    """Per-document loss of a packed row equals the document run alone (tolerance 1e-5)."""
    lm = model.build_tiny_model(preset, tok, seed=3).eval()
    lm.config._attn_implementation = impl
    documents = docs(tok)
    packed = batch_of(tok, documents)
    assert packed["input_ids"].shape[0] < len(documents)  # really packed
    sums = loss.forward_sums(lm, packed, impl)
    alone_loss, alone_targets = 0.0, 0
    for d in documents:
        ids = torch.tensor([d])
        logits = lm(input_ids=ids).logits[:, :-1]
        alone_loss += torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        alone_targets += len(d) - 1
    assert sums.targets == alone_targets
    assert sums.loss.item() / sums.targets == pytest.approx(alone_loss / alone_targets, rel=1e-5)
    # the same at the logit level, for both ways a packed row reaches a kernel: the dense
    # block mask (eager, SDPA) and positions only (what flash and flex attention get, with
    # transformers deriving the boundaries), and the check has teeth: positions that run on
    # across the row's documents (no restart) leave a plain causal mask, and the later
    # documents of a row see the earlier ones, so their logits move far more
    assert not loss.packs_by_positions(impl)
    ids, pos = packed["input_ids"].long(), packed["position_ids"].long()
    masked = loss.forward(lm, packed, impl).logits
    by_positions = lm(input_ids=ids, position_ids=pos, use_cache=False).logits
    running = torch.arange(ids.shape[1]).expand_as(ids)
    plain = lm(input_ids=ids, position_ids=running, use_cache=False).logits
    err = _error_against_alone(lm, packed, {"positions": by_positions, "masked": masked, "plain": plain})
    assert err["positions"] < 1e-5 and err["masked"] < 1e-5
    assert err["plain"] > 100 * max(err["positions"], err["masked"], 1e-7)


def _error_against_alone(lm, packed, outputs: dict) -> dict:
    """The largest logit difference between each document in its packed row and alone."""
    ids, seg = packed["input_ids"].long(), packed["segment_ids"]
    err = dict.fromkeys(outputs, 0.0)
    for r in range(ids.shape[0]):
        for s_id in seg[r].unique().tolist():
            if s_id == 0:
                continue
            where = (seg[r] == s_id).nonzero().squeeze(1)
            alone = lm(input_ids=ids[r, where][None]).logits[0]
            for name, logits in outputs.items():
                err[name] = max(err[name], (logits[r, where] - alone).abs().max().item())
    return err


def test_flash_and_flex_attention_get_positions_only():
    assert loss.packs_by_positions("flash_attention_2") and loss.packs_by_positions("flex_attention")
    assert not loss.packs_by_positions("sdpa") and not loss.packs_by_positions("eager")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliding_window_layers_keep_their_window_inside_each_packed_document(tok, impl):
    """A Mistral with an 8-token window, rows of 64: the block mask built here has no window,
    so such rows go by positions and transformers builds the windowed mask. The control: the
    block mask forced onto the same rows lets a document see past its window."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    lm = AutoModelForCausalLM.from_config(config).eval()
    lm.config._attn_implementation = impl
    packed = batch_of(tok, docs(tok))
    assert loss.sliding_window(lm.config) == 8 and loss.packs_by_positions(impl, lm.config, 64)
    assert not loss.packs_by_positions(impl, lm.config, 8)  # rows within the window keep the block mask
    ids, pos = packed["input_ids"].long(), packed["position_ids"].long()
    forced = lm(input_ids=ids, attention_mask=loss.block_causal_mask(packed["segment_ids"], impl, torch.float32),
                position_ids=pos, use_cache=False).logits
    err = _error_against_alone(lm, packed, {"forward": loss.forward(lm, packed, impl).logits, "forced": forced})
    assert err["forward"] < 1e-5
    assert err["forced"] > 100 * max(err["forward"], 1e-7)


@pytest.mark.gpu
def test_flash_attention_2_packed_rows_equal_each_document_alone(tok):
    """FlashAttention-2 takes no dense mask: a packed row reaches it as restarting positions
    (the variable-length kernel). bf16 on CUDA, so the tolerance is bf16's."""
    pytest.importorskip("flash_attn")
    lm = model.build_tiny_model("tiny-llama", tok, seed=3).to("cuda", torch.bfloat16).eval()
    lm.config._attn_implementation = "flash_attention_2"
    packed = {k: v.cuda() for k, v in batch_of(tok, docs(tok)).items()}
    reference = model.build_tiny_model("tiny-llama", tok, seed=3).to("cuda", torch.bfloat16).eval()
    assert loss.packs_by_positions("flash_attention_2")
    out = loss.forward(lm, packed, "flash_attention_2").logits
    assert _error_against_alone(reference, packed, {"fa2": out})["fa2"] < 0.05


def test_padded_rows_give_finite_loss_and_gradients(tok):
    lm = lora_model(tok)
    batch = batch_of(tok, docs(tok), mode="pad")
    assert (batch["segment_ids"] == 0).any()
    sums = loss.forward_sums(lm, batch, "sdpa")
    sums.loss.backward()
    assert math.isfinite(sums.loss.item())
    assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.requires_grad)


def _micro_batches(tok):
    """Three micro-batches with very different target counts (the case per-batch
    averaging gets wrong)."""
    long = docs(tok, ["a longer document about widgets, shipping and returns"])
    return [batch_of(tok, long), batch_of(tok, docs(tok, ["hi"])), batch_of(tok, docs(tok, TEXTS[:2]))]


def test_gradient_accumulation_equals_one_big_batch(tok):
    micro = _micro_batches(tok)
    big = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    results = []
    for window in (micro, [big]):
        lm = lora_model(tok)
        opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=1.0)  # new = old - grad
        out = loss.train_step(lm, opt, window, device=torch.device("cpu"), world_size=1, attn_impl="sdpa", max_grad_norm=None)
        results.append((out, {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}))
    (acc, acc_params), (one, one_params) = results
    assert acc["targets"] == one["targets"]
    assert acc["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert acc["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for name in acc_params:
        torch.testing.assert_close(acc_params[name], one_params[name], rtol=1e-5, atol=1e-7)
    # teeth: averaging the micro-batch means is a different loss
    lm = lora_model(tok)
    per_batch = [loss.forward_sums(lm, m, "sdpa") for m in micro]
    naive = sum(s.loss.item() / s.targets for s in per_batch) / len(per_batch)
    assert abs(naive - one["loss"]) > 1e-3


@pytest.mark.parametrize("method", ["lora", "dora", "hybrid", "full"])
def test_each_method_trains_exactly_its_parameters(tok, method):
    extra = {"modules_to_save": ["embed_tokens"]} if method == "hybrid" else {}
    lm = lora_model(tok, method=method, **extra)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    loss.train_step(lm, opt, [batch_of(tok, docs(tok))], device=torch.device("cpu"), world_size=1, attn_impl="sdpa", max_grad_norm=1.0)
    changed = {n for n, p in lm.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    if method == "full":
        assert changed == trainable == set(before)
        return
    adapters = {n for n in changed if "lora_" in n}
    assert adapters, "LoRA weights must train"
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in changed)
    saved = {n for n in changed if "modules_to_save" in n}
    if method == "hybrid":
        assert saved and all("embed_tokens" in n for n in saved)
        assert changed == adapters | saved  # the adapters and the chosen module, nothing else
        frozen = [n for n in before if "original_module" in n]
        assert frozen and not set(frozen) & changed
    else:
        assert not saved and changed == adapters


def test_lr_schedule_warmup_then_decay():
    f = [loss.lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[99] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert loss.lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert loss.lr_factor(80, 100, 0, "constant") == 1.0


def test_plan_steps_equal_shards():
    s = plan_steps(train_rows=81, world=2, batch_size=8, grad_accum=2, epochs=3, max_steps=None)
    assert (s.rows_per_worker, s.micro_per_epoch, s.steps_per_epoch, s.total) == (40, 5, 3, 9)
    capped = plan_steps(81, 1, 8, 1, 3, max_steps=25)
    assert capped.total == 25 and capped.epochs == 3


@pytest.mark.parametrize("method", ["lora", "hybrid", "full"])
def test_checkpointed_weights_round_trip(tok, tmp_path, method):
    extra = {"modules_to_save": ["embed_tokens"]} if method == "hybrid" else {}
    trained = lora_model(tok, method=method, **extra)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    checkpoint.save_model(trained, str(tmp_path))
    fresh = lora_model(tok, method=method, seed=99, **extra)
    checkpoint.load_model_weights(fresh, str(tmp_path))
    for (n, a), (_, b) in zip(trained.named_parameters(), fresh.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_save_refuses_a_partial_adapter(tok, tmp_path, monkeypatch):
    """The sharded-adapter bug: a save missing tensors or with wrong shapes must fail."""
    lm = lora_model(tok)
    real = checkpoint.expected_tensors(lm)
    fake = copy.deepcopy(real)
    name = next(iter(fake))
    fake[name] = (fake[name][0] * 2, *fake[name][1:])
    monkeypatch.setattr(checkpoint, "expected_tensors", lambda m: fake)
    with pytest.raises(RuntimeError, match="does not match the model"):
        checkpoint.save_model(lm, str(tmp_path))


def test_flops_formula_counts_trainable_weight_gradients(tok):
    from raylab.train import metrics

    lora = metrics.flops_per_token(lora_model(tok), 64)
    full = metrics.flops_per_token(lora_model(tok, method="full"), 64)
    assert lora["trainable_params"] < full["trainable_params"] == full["params"]
    assert lora["flops_per_token"] < full["flops_per_token"]
    # full fine-tuning: 6 N + attention, N excluding the (tied) input embedding lookup
    attention = 12 * 2 * 64 * 64
    assert full["flops_per_token"] == 4 * full["matmul_params"] + 2 * full["trainable_params"] + attention
