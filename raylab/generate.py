"""A trained model for inference, and greedy answers to prompts.

Shared by `raylab eval`, the promotion gates and the serve stage, so all of them load a
version the same way and render prompts with the chat template the training used (it is
saved with the tokenizer in train/final/).

    model, tok = load("runs/quickstart/train/final")
    greedy(model, tok, [prompt_ids(tok, {"prompt": "How do I connect from home?"})], 32)

A prompt is one of: `{"messages": [...]}` (chat; the assistant turn is generated), `{"prompt":
"..."}` (an instruction: one user message), `{"text": "..."}` (plain completion, no template).
"""

from __future__ import annotations

import json
import os
from typing import Any

from raylab.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def is_adapter(path: str) -> bool:
    return os.path.exists(os.path.join(path, "adapter_config.json"))


def base_of(path: str) -> str:
    """The base model an adapter directory was trained on."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f)["base_model_name_or_path"]


def trained_from(path: str) -> str:
    """The base model a full fine-tune in `path` started from (its raylab_train.json)."""
    meta = os.path.join(path, "raylab_train.json")
    if not os.path.exists(meta):
        raise UserError(f"{path}: no raylab_train.json, so the base model it was trained from is unknown")
    with open(meta) as f:
        found = json.load(f)
    return found.get("base_model_path") or found["base_model"]


def load(path: str, tokenizer_path: str | None = None, dtype: str = "float32", base: bool = False):
    """(model in eval mode, tokenizer). `path` is a trained final/ directory (adapter or full
    model) or a base model; `base=True` loads the model it was trained from instead, with
    the trained tokenizer (the one the data was encoded with)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in a stage's log
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft on transformers 5
    adapter = is_adapter(path)
    weights = base_of(path) if adapter else (trained_from(path) if base else path)
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=getattr(torch, dtype))
    if adapter and not base:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    return model.eval(), tokenizer(tokenizer_path or path)


def tokenizer(path: str):
    """A saved tokenizer (with its chat template), padding with end-of-sequence if it has no pad."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_messages(messages: Any, where: str) -> list[dict]:
    """A non-empty list of {role, content} with known roles, or a UserError naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UserError(f"{where}: messages[{i}] must be {{role: one of {list(ROLES)}, content: text}}, got {m!r:.120}")
    return messages


def prompt_ids(tok, item: dict, where: str = "prompt") -> list[int]:
    """Token ids of one prompt, rendered as in training."""
    if "messages" in item:
        messages = check_messages(item["messages"], where)
    elif isinstance(item.get("prompt"), str):
        messages = [{"role": "user", "content": item["prompt"]}]
    elif isinstance(item.get("text"), str):
        return tok(item["text"], add_special_tokens=True)["input_ids"]
    else:
        raise UserError(f"{where}: expected a 'messages' list, a 'prompt' string or a 'text' string")
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    return list(out["input_ids"])


def left_pad(rows: list[list[int]], pad_id: int):
    """[batch, longest] input ids and attention mask, padded on the left so every row's
    next token is generated at the same position."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def greedy(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers (KV cache on), stopping at the end-of-turn token."""
    import torch

    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True,
                             temperature=None, top_p=None, top_k=None)
    return [tok.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]
