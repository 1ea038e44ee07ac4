"""Tiny served models for the serve tests: a base built from a preset with its embeddings
scaled up (at the default init a tied-embedding tiny model cannot produce confident logits,
so LoRA alone could not learn anything checkable), and LoRA adapters trained with peft in a
few seconds to give a fixed answer (so greedy text is far from ties)."""

from __future__ import annotations

from pathlib import Path

QUESTIONS = [f"When does my {c} widget ship?" for c in ("red", "blue", "green", "black")]


def build_base(path: Path, preset: str = "tiny-llama") -> None:
    """A tiny base (a preset with its embeddings scaled up) saved with its byte tokenizer."""
    import torch

    from raylab import models as model

    tok = model.build_byte_tokenizer()
    tok.chat_template = model.DEFAULT_CHAT_TEMPLATE
    lm = model.build_tiny_model(preset, tok, seed=123)
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(10)
    tok.save_pretrained(path)
    lm.save_pretrained(path)


def train_adapter(base: Path, out: Path, answer: str, steps: int = 200, questions: list[str] = QUESTIONS,
                  lr: float = 3e-3, **lora) -> float:
    """A LoRA adapter (peft, all linear layers; `lora`: more LoraConfig, e.g. use_dora) trained
    to give `answer` to `questions`; returns the last loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    rows = []
    for q in questions:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        rows.append((list(prompt), tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (p, t) in enumerate(rows):
        ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
        mask[i, :len(p) + len(t)] = 1
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(**{"r": 16, "lora_alpha": 32, "target_modules": "all-linear", **lora}))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        # Clipped: the scaled-up embeddings give large early gradients, and without a clip the
        # run could stall on a plateau depending on the CPU's kernels (mini-llama's tool-call
        # answer ended at a loss of 1.17 on an AMD EPYC machine and converged elsewhere; at
        # 8e-3 three of four answers stalled). Clipped, every answer here reaches < 0.03 on both
        # presets at lr 3e-3 and 5e-3, 1 or 2 threads.
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return loss.item()
