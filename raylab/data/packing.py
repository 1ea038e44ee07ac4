"""Tokenization and packing: the data stage's output contract with the trainer.

Tokenization (`Tokenize`, a Ray Data actor-pool UDF: the tokenizer is loaded once per
actor through raylab.model.load_tokenizer, the same path training and serving use):
    completion  ids = tokens(text) + [eos]; every token is a target
    chat        ids = the tokenizer's chat template rendered over the messages; targets are
                the assistant turns only (their content and end-of-turn token), unless
                data.train_on_prompt. Templates with `{% generation %}` blocks give the mask
                directly; for others it is found by rendering prefixes of the conversation.
    Longer than validation.max_tokens (default max_seq_len): rejected (`too_many_tokens`,
    to the quarantine) or truncated, as validation.over_max_tokens says.

Packing contract (one row per training sequence, every list exactly `seq_len` long):
    input_ids     int32 token ids; padding uses the tokenizer's pad id
    labels        int32 targets aligned with input_ids (the model shifts them); -100 where
                  no loss is taken: prompts, padding, and the FIRST token of every document,
                  so no position is trained to predict across a document boundary
    position_ids  int32, restarting at 0 for each document (0 on padding)
    segment_ids   int32, 1, 2, ... per document in the row, 0 on padding
    num_tokens    real (non-padding) tokens in the row
A trainer must let a token attend only to earlier tokens of the same segment: build the
block-diagonal causal mask from segment_ids (or hand position_ids to a varlen attention
kernel). Packing is first-fit-decreasing within a batch of documents. `pad` mode puts each
document alone in its row (for comparison; the same contract holds, with one segment).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

IGNORE = -100
TOKENIZED_SCHEMA = pa.schema([
    ("source", pa.string()), ("record_id", pa.string()), ("raw", pa.string()), ("format", pa.string()),
    ("text", pa.string()), ("messages", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("reason", pa.string()), ("message", pa.string()),
])
PACKED_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())), ("segment_ids", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
])


def encode_text(tok, text: str) -> tuple[list[int], list[int]]:
    return encode_batch(tok, [text], [""], train_on_prompt=True)[0]


def encode_chat(tok, messages: list[dict], train_on_prompt: bool) -> tuple[list[int], list[int]]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    mask = list(out.get("assistant_masks") or [])
    if not any(mask):  # a template without {% generation %}: find answers by prefixes
        mask = [0] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(tok.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
            end = len(tok.apply_chat_template(messages[:k + 1], tokenize=True, return_dict=True)["input_ids"])
            mask[start:end] = [1] * (end - start)
    labels = ids if train_on_prompt else [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    return ids, list(labels)


def encode_batch(tok, texts: list[str], messages: list[str], train_on_prompt: bool) -> list[tuple[list[int], list[int]]]:
    """Encode a batch: completion texts in one fast-tokenizer call (Rust, batched); chats
    one by one (the chat template is rendered per conversation)."""
    out: list = [None] * len(texts)
    plain = [i for i, m in enumerate(messages) if not m]
    if plain:
        encoded = tok([texts[i] for i in plain], add_special_tokens=True)["input_ids"]
        for i, ids in zip(plain, encoded, strict=True):
            ids = [*ids, tok.eos_token_id]
            out[i] = (ids, list(ids))
    for i, m in enumerate(messages):
        if m:
            out[i] = encode_chat(tok, json.loads(m), train_on_prompt)
    return out


class Tokenize:
    """Ray Data actor UDF: documents -> token ids and labels (or a too_many_tokens reject)."""

    def __init__(self, model_cfg: dict, max_tokens: int, over: str, train_on_prompt: bool):
        from raylab.config import ModelConfig
        from raylab.models import load_tokenizer

        self.tok = load_tokenizer(ModelConfig(**model_cfg))
        self.max_tokens, self.over, self.train_on_prompt = max_tokens, over, train_on_prompt

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        records = batch.to_pylist()
        encoded = encode_batch(self.tok, [r["text"] for r in records], [r["messages"] for r in records], self.train_on_prompt)
        for r, (ids, labels) in zip(records, encoded, strict=True):
            reason = message = ""
            if len(ids) > self.max_tokens:
                if self.over == "truncate":
                    ids, labels = ids[: self.max_tokens], labels[: self.max_tokens]
                    if all(x == IGNORE for x in labels[1:]):
                        reason, message = "too_many_tokens", f"truncating to {self.max_tokens} tokens leaves no response to learn"
                else:
                    reason, message = "too_many_tokens", f"{len(ids)} tokens, more than validation.max_tokens={self.max_tokens}"
            rows.append({**{k: r[k] for k in ("source", "record_id", "raw", "format", "text", "messages")},
                         "input_ids": [] if reason else ids, "labels": [] if reason else labels,
                         "reason": reason, "message": message})
        return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)


def _row(docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict:
    input_ids = np.full(seq_len, pad_id, dtype=np.int32)
    labels = np.full(seq_len, IGNORE, dtype=np.int32)
    positions = np.zeros(seq_len, dtype=np.int32)
    segments = np.zeros(seq_len, dtype=np.int32)
    at = 0
    for seg, (ids, lab) in enumerate(docs, start=1):
        n = len(ids)
        input_ids[at:at + n] = ids
        labels[at:at + n] = lab
        labels[at] = IGNORE  # never predict a document's first token from the previous one
        positions[at:at + n] = np.arange(n)
        segments[at:at + n] = seg
        at += n
    return {"input_ids": input_ids.tolist(), "labels": labels.tolist(), "position_ids": positions.tolist(),
            "segment_ids": segments.tolist(), "num_tokens": at}


def pack_batch(batch: pa.Table, seq_len: int, pad_id: int, mode: str) -> pa.Table:
    docs = [d for d in zip(batch["input_ids"].to_pylist(), batch["labels"].to_pylist(), strict=True) if d[0]]
    too_long = [len(d[0]) for d in docs if len(d[0]) > seq_len]
    if too_long:  # Tokenize enforces max_tokens <= seq_len; anything else is a bug upstream
        raise ValueError(f"documents of {too_long[:3]} tokens exceed seq_len={seq_len}")
    if mode == "pad":
        return pa.Table.from_pylist([_row([d], seq_len, pad_id) for d in docs], schema=PACKED_SCHEMA)
    bins: list[list] = []
    space: list[int] = []
    for doc in sorted(docs, key=lambda d: -len(d[0])):  # first-fit decreasing
        n = len(doc[0])
        for i, free in enumerate(space):
            if n <= free:
                bins[i].append(doc)
                space[i] -= n
                break
        else:
            bins.append([doc])
            space.append(seq_len - n)
    return pa.Table.from_pylist([_row(b, seq_len, pad_id) for b in bins], schema=PACKED_SCHEMA)


def in_val(record_id: str, seed: int, fraction: float, source: str | None = None,
           val_sources: list[str] | tuple[str, ...] = ()) -> bool:
    """Deterministic split by record id: the same record is always on the same side. A record
    of one of `val_sources` (data.val_sources) is always in val."""
    import hashlib

    if source is not None and source in val_sources:
        return True
    h = int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """The block-diagonal causal mask a trainer builds from segment_ids ([seq, seq] bool):
    True where query i may attend key j."""
    seg = np.asarray(segment_ids)
    same = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0)
    return same & np.tril(np.ones((len(seg), len(seg)), dtype=bool))
