"""torchao quantisation of a tiny random Llama (raylab/optimize/quantize.py), no registry,
no Ray: every eligible Linear is quantised and counted; int8 logits stay within TOL of the
float model's, and a deliberately broken scale fails the same check; embeddings are
untied and quantised when asked; the saved directory reloads in a fresh process with plain
transformers + torchao (no raylab) as the same int8 tensors, without quantising again;
int4 without CUDA/XPU and a model with no Linear to quantise are refused (exit-2 errors)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from raylab import models
from raylab.errors import UserError
from raylab.optimize import quantize as q

pytest.importorskip("torchao")

# Relative max logit error (max |Δlogits| / max |logits|) int8 may cost on the tiny model:
# per-row symmetric int8 keeps each weight within half a step (1/254 of its row's range), so
# measured drifts are ~0.01; a scale off by 10x moves the logits by far more than TOL.
TOL = 0.05
IDS = torch.tensor([[5, 60, 70, 80, 90, 100, 110, 3, 44, 200]])
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def float_model():
    tok = models.build_byte_tokenizer()
    return models.build_tiny_model("tiny-llama", tok, seed=7).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["int8_weight_only", "int8_dynamic"])
def test_every_eligible_linear_is_quantised_and_logits_stay_within_tolerance(float_model, method):
    reference = logits(float_model)
    model = copy.deepcopy(float_model)
    done = q.quantize(model, method)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in float_model.modules())
    layers = float_model.config.num_hidden_layers
    # the tied LM head stays float without include_embeddings: every other Linear counts
    assert len(done.eligible) == n_linear - 1 == layers * LINEARS_PER_LAYER
    assert done.quantized == done.eligible and done.skipped == []
    assert "lm_head" not in done.eligible and not q.is_quantized(model.lm_head.weight)
    assert all(q.is_quantized(dict(model.named_modules())[n].weight) for n in done.quantized)
    drift = q.logit_drift(reference, logits(model))
    assert 0 < drift < TOL, drift  # > 0: the weights really are int8 now

    # negative control: one quantised layer's scale multiplied by 10 fails the same check
    broken = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        broken.scale.mul_(10)
    assert q.logit_drift(reference, logits(model)) > TOL


def test_include_embeddings_unties_the_head_and_quantises_both(float_model):
    model = copy.deepcopy(float_model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the preset builds it
    done = q.quantize(model, "int8_weight_only", include_embeddings=True)
    assert {"lm_head", "model.embed_tokens"} <= set(done.quantized)
    assert len(done.quantized) == len(done.eligible) == float_model.config.num_hidden_layers * LINEARS_PER_LAYER + 2
    assert model.config.tie_word_embeddings is False
    assert q.is_quantized(model.lm_head.weight) and q.is_quantized(model.model.embed_tokens.weight)
    assert q.logit_drift(logits(float_model), logits(model)) < TOL


RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
from torchao.utils import TorchAOBaseTensor
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(k == "raylab" or k.startswith("raylab.") for k in sys.modules), "raylab was imported"
w = m.model.layers[0].self_attn.q_proj.weight
with torch.no_grad():
    out = m(input_ids=torch.tensor([IDS])).logits
torch.save({"logits": out, "qdata": w.qdata, "subclass": isinstance(w, TorchAOBaseTensor),
            "embed": isinstance(m.model.embed_tokens.weight, TorchAOBaseTensor)}, sys.argv[2])
""".replace("IDS", str(IDS[0].tolist()))


def test_saved_model_reloads_in_plain_transformers_as_the_same_int8_tensors(float_model, tmp_path):
    model = copy.deepcopy(float_model)
    q.quantize(model, "int8_dynamic", include_embeddings=True)
    q.make_saveable(model, "int8_dynamic", include_embeddings=True)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "m"), str(tmp_path / "out.pt")], check=True,
                   timeout=120)
    got = torch.load(tmp_path / "out.pt")
    assert got["subclass"] and got["embed"]  # loaded as torchao int8 tensors, not float
    # the very int8 values saved (re-quantising dequantised weights could round differently)
    assert torch.equal(got["qdata"], model.model.layers[0].self_attn.q_proj.weight.qdata)
    torch.testing.assert_close(got["logits"], logits(model), rtol=0, atol=1e-5)
    reloaded = models.load(str(tmp_path / "m"), with_tokenizer=False).model
    assert q.already_quantized(reloaded)  # and it is refused a second time:
    with pytest.raises(UserError, match="already quantised"):
        q.quantize(reloaded, "int8_weight_only")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine int4 is allowed")
def test_int4_without_cuda_or_xpu_is_refused_naming_the_key():
    with pytest.raises(UserError, match=r"^optimize\.quantize: int4_weight_only needs a CUDA or XPU device"):
        q.check_device("int4_weight_only")
    assert q.check_device("int8_weight_only") == "cpu"  # negative control: int8 runs on the CPU


def test_a_model_with_nothing_to_quantise_is_refused():
    # GPT-2 computes attention and MLP with transformers' Conv1D, not nn.Linear: without the
    # embeddings (the tied head included) there is no layer torchao's Linear path changes.
    gpt2 = models.build_tiny_model("tiny-gpt2", models.build_byte_tokenizer(), seed=1).eval()
    with pytest.raises(UserError, match="quantised none of the model's 0 eligible layers"):
        q.quantize(copy.deepcopy(gpt2), "int8_weight_only")
    done = q.quantize(gpt2, "int8_weight_only", include_embeddings=True)  # negative control: with them, it does
    assert set(done.quantized) == {"transformer.wte", "lm_head"}
