"""The model families companies fine-tune, as tiny random-weight models built from each
family's real config class (issue 22 item 5): Llama 3 (llama3 rope scaling), Qwen 2.5, Qwen 3,
Mistral, Gemma 2, Gemma 3, Phi-2 and Phi-3. For each, without Ray:

- a packed row computes what each document computes alone, with eager and SDPA attention
  (per-document positions and raylab's block mask; Gemma's sliding-window layers, logit
  soft-capping and Phi-3's fused projections included);
- `raylab validate`'s module check (`models.training_problems`) accepts `all-linear` and the
  family's own attention projections, and names a module the family does not have;
- LoRA on all linear layers trains (the loss falls over a few steps), merges into the base,
  and the merged model saved with `save_pretrained` reloads in plain transformers giving the
  adapter model's logits.

The byte-level tokenizer stands in for each family's own (no hub here)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from families import FAMILIES, build

from raylab import models as model
from raylab.config import ModelConfig
from raylab.data.packing import pack_batch
from raylab.train import loss

pytestmark = pytest.mark.filterwarnings("ignore")

TEXTS = ["the red widget ships today", "a blue one ships next week, maybe", "ok",
         "green widgets are out of stock again", "returns take five working days"]


def packed_batch(tok, seq_len: int = 64) -> dict[str, torch.Tensor]:
    documents = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    rows = pack_batch(pa.table({"input_ids": documents, "labels": documents}), seq_len, tok.pad_token_id, "pack").to_pylist()
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids", "segment_ids")}


@pytest.fixture(scope="module")
def tok():
    return model.build_byte_tokenizer()


# Gemma 2 soft-caps attention logits, which SDPA cannot (validate refuses it, below).
KERNELS = [(f, impl) for f in FAMILIES for impl in ("eager", "sdpa") if not (f == "gemma2" and impl == "sdpa")]


@pytest.mark.parametrize("family,impl", KERNELS)
def test_a_packed_row_equals_each_document_alone(tok, family, impl):
    """Gemma's window (32) is shorter than some documents: the sliding layers must keep it
    inside each document too."""
    lm = build(family, tok).eval()
    lm.config._attn_implementation = impl
    batch = packed_batch(tok)
    out = loss.forward(lm, batch, impl).logits
    seg, ids = batch["segment_ids"], batch["input_ids"].long()
    worst, documents = 0.0, 0
    for r in range(ids.shape[0]):
        for s in seg[r].unique().tolist():
            if s == 0:
                continue
            where = (seg[r] == s).nonzero().squeeze(1)
            alone = lm(input_ids=ids[r, where][None], use_cache=False).logits[0]
            worst = max(worst, (out[r, where] - alone).abs().max().item())
            documents += 1
    assert documents > ids.shape[0]  # really packed: more documents than rows
    assert worst < 1e-4, f"{family}/{impl}: packed logits differ from alone by {worst}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_validate_checks_the_familys_module_names(tok, family, tmp_path):
    build(family, tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    named = FAMILIES[family]["attention"]
    for targets in (["all-linear"], named):
        cfg = ModelConfig(name_or_path=str(tmp_path), lora={"target_modules": targets})
        assert model.training_problems(cfg, 64, 0) == [], (family, targets)
    wrong = ModelConfig(name_or_path=str(tmp_path), lora={"target_modules": ["query_key_value"]})
    found = model.training_problems(wrong, 64, 0)
    assert len(found) == 1 and "no module named ['query_key_value']" in found[0], found
    sdpa = model.training_problems(ModelConfig(name_or_path=str(tmp_path), attn_implementation="sdpa"), 64, 0)
    if family == "gemma2":
        assert len(sdpa) == 1 and sdpa[0].startswith("model.attn_implementation=sdpa: this gemma2 model soft-caps"), sdpa
    else:
        assert sdpa == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_trains_merges_and_reloads_in_plain_transformers(tok, family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name_or_path="preset:tiny-llama", lora={"r": 8, "dropout": 0.0})
    lm = model.apply_method(build(family, tok), cfg)
    impl = "eager" if family == "gemma2" else "sdpa"
    lm.config._attn_implementation = impl
    batch = packed_batch(tok)
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        sums = loss.forward_sums(lm, batch, impl, accuracy=False)
        (sums.loss / sums.targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sums.loss.item() / sums.targets)
    assert losses[-1] < losses[0] - 0.05, losses
    lm.eval()
    probe = batch["input_ids"][:1, :24].long()
    with torch.no_grad():
        adapted = lm(input_ids=probe).logits
        merged = lm.merge_and_unload()
        # float32 round-off of a changed summation order, relative to the logits' size (gemma2's
        # eager path under transformers 5.19 differs by 1.2e-4 on logits of this size)
        torch.testing.assert_close(merged(input_ids=probe).logits, adapted, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__module__.startswith("transformers.models.")  # plain transformers, no peft
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, adapted, rtol=1e-4, atol=1e-4)
