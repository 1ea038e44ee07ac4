"""Prompts rendered as in training, and greedy answers: shared by `raylab eval`, the
promotion gates and the serve stage, so all of them render prompts with the chat template
the training used (it is saved with the tokenizer in train/final/).

    model, tok = inference.load("runs/quickstart/train/final")
    greedy(model, tok, [prompt_ids(tok, {"prompt": "How do I connect from home?"})], 32)

A prompt is one of: `{"messages": [...]}` (chat; the assistant turn is generated), `{"prompt":
"..."}` (an instruction: one user message), `{"text": "..."}` (plain completion, no template).
"""

from __future__ import annotations

from typing import Any

from raylab.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


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
    return [tok.decode(row, skip_special_tokens=True).strip() for row in greedy_ids(model, tok, prompts, max_new_tokens)]


def greedy_ids(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The generated token ids of each prompt's greedy answer, up to its end-of-turn token
    (excluded): what a speed budget counts."""
    import torch

    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True,
                             temperature=None, top_p=None, top_k=None)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        stop = {tok.eos_token_id, tok.pad_token_id} - {None}
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:end])
    return rows
