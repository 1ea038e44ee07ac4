"""`model.dtype`: `auto` is the checkpoint's own dtype on a GPU (transformers' dtype="auto")
and float32 on CPU; an explicit dtype is honoured; the choice is what the train loop records
and what `raylab doctor` prints, read from the model's config without loading weights."""

from __future__ import annotations

import pytest
import torch

from raylab import models
from raylab.config import ModelConfig


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    """A tiny Llama saved in bfloat16, as most published checkpoints are."""
    path = tmp_path_factory.mktemp("bf16-llama")
    tok = models.build_byte_tokenizer()
    lm = models.build_tiny_model("tiny-llama", tok, seed=1).to(torch.bfloat16)
    tok.save_pretrained(path)
    lm.save_pretrained(path)
    return path


def test_the_checkpoint_dtype_is_read_from_its_config(bf16_model_dir, tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(bf16_model_dir))
    assert models.checkpoint_dtype(models.load_config(cfg)) == "bfloat16"
    assert models.checkpoint_dtype(models.load_config(ModelConfig(name_or_path=str(tiny_model_dir)))) == "float32"


def test_auto_on_cpu_is_float32_even_for_a_bf16_checkpoint(bf16_model_dir):
    cfg = ModelConfig(name_or_path=str(bf16_model_dir))  # dtype: auto (the default)
    dtype, why = models.resolved_dtype(cfg, torch.device("cpu"))
    assert dtype == "float32" and "CPU" in why and "bfloat16" in why
    assert next(models.load_model(cfg).parameters()).dtype == torch.float32
    trained = models.load_for_training(cfg, torch.device("cpu"))
    assert {p.dtype for p in trained.parameters()} == {torch.float32}


def test_an_explicit_dtype_is_honoured_on_cpu(bf16_model_dir, tiny_model_dir):
    for path in (bf16_model_dir, tiny_model_dir):
        cfg = ModelConfig(name_or_path=str(path), dtype="bfloat16")
        assert models.resolved_dtype(cfg, torch.device("cpu")) == ("bfloat16", "model.dtype")
        assert next(models.load_model(cfg).parameters()).dtype == torch.bfloat16
    fp32 = ModelConfig(name_or_path=str(bf16_model_dir), dtype="float32")
    assert next(models.load_model(fp32).parameters()).dtype == torch.float32


def test_auto_on_a_gpu_keeps_the_checkpoints_dtype():
    # The decision alone (a GPU is not needed to make it; the gpu test below loads one).
    assert models.choose_dtype("auto", "cuda", "bfloat16") == ("bfloat16", "auto: the checkpoint's own dtype")
    assert models.choose_dtype("auto", "cuda", "float16")[0] == "float16"
    assert models.choose_dtype("auto", "cuda", "float32")[0] == "float32"
    assert models.choose_dtype("auto", "cuda", None)[0] == "float32"
    assert models.choose_dtype("auto", "cuda", "bfloat16", bf16_supported=False)[0] == "float32"
    assert models.choose_dtype("float16", "cpu", "bfloat16") == ("float16", "model.dtype")


def test_doctor_describes_the_model_from_its_config_without_loading_weights(bf16_model_dir, monkeypatch):
    import transformers

    def no_weights(*_a, **_k):
        raise AssertionError("doctor loaded the weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    lines = models.describe(ModelConfig(name_or_path=str(bf16_model_dir)))
    text = "\n".join(lines)
    expected = sum(p.numel() for p in models.build_tiny_model("tiny-llama", models.build_byte_tokenizer()).parameters())
    assert f"{expected:,} parameters" in text
    assert "checkpoint dtype bfloat16" in text
    assert "model.dtype auto -> float32 on CPU workers" in text
    gpu = "\n".join(models.describe(ModelConfig(name_or_path=str(bf16_model_dir)), gpus_per_worker=1))
    assert "model.dtype auto -> bfloat16 on GPU workers" in gpu


@pytest.mark.gpu
def test_auto_on_a_gpu_loads_bf16_and_trains_the_adapter_in_float32(bf16_model_dir):
    cfg = ModelConfig(name_or_path=str(bf16_model_dir))
    device = torch.device("cuda")
    lm = models.load_for_training(cfg, device)
    frozen = {p.dtype for p in lm.parameters() if not p.requires_grad}
    trained = {p.dtype for p in lm.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
