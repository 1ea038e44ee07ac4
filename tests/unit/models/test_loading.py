"""Models and tokenizers through the same from_pretrained path a user's model takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from raylab import models as model
from raylab.config import ModelConfig
from raylab.errors import UserError


def test_tiny_model_loads_back_from_a_directory(tiny_model_dir):
    tok = model.load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    lm = model.load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    again = model.build_tiny_model("tiny-llama", model.build_byte_tokenizer(), seed=123)
    ids = torch.tensor([tok("Acme pays on the 25th.")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, again(ids).logits, atol=1e-6)
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert tok.decode(ids[0]) == "Acme pays on the 25th."
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"


def test_chat_template_is_saved_with_the_tokenizer(tiny_model_dir):
    assert (tiny_model_dir / "chat_template.jinja").exists()
    tok = model.load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # Only the assistant's answer (and its end-of-turn token) is marked for the loss.
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(marked) == "hello<|im_end|>"


def test_template_file_overrides_and_changes_the_fingerprint(tiny_model_dir, tmp_path):
    base = model.load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    custom = model.load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), chat_template=str(template)))
    assert custom.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "user: x\n"
    a, b = model.fingerprint(base), model.fingerprint(custom)
    assert a["vocab_hash"] == b["vocab_hash"] and a["template_hash"] != b["template_hash"]
    assert a["fingerprint"] != b["fingerprint"]
    assert model.fingerprint(base) == a  # stable
    with pytest.raises(UserError, match="model.chat_template: cannot read"):
        model.load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), chat_template=str(tmp_path / "no.jinja")))


def test_preset_outlives_the_process_that_made_it(raylab_home):
    code = "from raylab.models import materialize_preset; print(materialize_preset('tiny-gpt2'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "RAYLAB_HOME": str(raylab_home)})
    path = out.stdout.strip().splitlines()[-1]
    assert path == str(raylab_home / "models" / "tiny-gpt2")
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert json.loads(open(os.path.join(path, "raylab_preset.json")).read())["preset"] == "tiny-gpt2"
    cfg = ModelConfig(name_or_path="preset:tiny-gpt2")
    lm = model.load_model(cfg)  # loads the files the other process wrote, no rebuild
    assert type(lm).__name__ == "GPT2LMHeadModel"
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    assert model.fingerprint(model.load_tokenizer(cfg))["vocab_size"] == len(model.build_byte_tokenizer())


def test_a_preset_another_process_finished_meanwhile_is_kept_not_replaced(raylab_home, monkeypatch):
    """Two processes building one preset: the one that finishes second keeps the first one's
    copy (a worker may be loading it) instead of deleting it to rename its own into place.
    The other process is simulated by finishing a copy while this one builds; the sentinel
    file in that copy survives only if it is kept."""
    from raylab.models import presets

    built = presets.build_tiny_model
    first = presets.materialize_preset("tiny-gpt2")
    (first / "in-use.txt").write_text("a worker is reading this copy")
    marker = first / "raylab_preset.json"
    stamp = marker.read_text()
    marker.unlink()  # as if this process started before the other one finished...

    def finish_other_then_build(name, tok):
        marker.write_text(stamp)  # ...and the other one finished while this one built
        return built(name, tok)

    monkeypatch.setattr(presets, "build_tiny_model", finish_other_then_build)
    assert presets.materialize_preset("tiny-gpt2") == first
    assert (first / "in-use.txt").exists() and (first / "model.safetensors").exists()
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tiny-gpt2-")]  # no staging left
    # the control: a stale copy (no marker) is replaced by a complete one
    marker.unlink()
    monkeypatch.setattr(presets, "build_tiny_model", built)
    assert presets.materialize_preset("tiny-gpt2") == first
    assert not (first / "in-use.txt").exists() and json.loads(marker.read_text())["preset"] == "tiny-gpt2"


def test_bad_model_references():
    with pytest.raises(UserError, match="unknown preset 'tiny-nope'; expected one of: preset:tiny-llama"):
        model.resolve("preset:tiny-nope")
    with pytest.raises(UserError, match="local directory /nonexistent/model does not exist"):
        model.resolve("/nonexistent/model")


def test_dtype_choice(tiny_model_dir):
    lm = model.load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16"))
    assert next(lm.parameters()).dtype == torch.bfloat16


@pytest.mark.gpu
def test_tiny_model_runs_bf16_on_cuda(tiny_model_dir):
    lm = model.load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16")).cuda()
    ids = torch.arange(10, 40, device="cuda")[None]
    with torch.no_grad():
        logits = lm(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
