"""Base models and tokenizers through `from_pretrained`, shared by the data, train and serve
stages.

    tok = load_tokenizer(cfg.model)          # hub id, local directory or preset:NAME
    model = load_model(cfg.model)            # the same from_pretrained path for all three
    fingerprint(tok)["fingerprint"]          # recorded by the data stage, checked by train

Every tokenizer carries a chat template: its own, the file named by `model.chat_template`,
or the presets' DEFAULT_CHAT_TEMPLATE.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from raylab.config import ModelConfig
from raylab.errors import UserError
from raylab.models.presets import DEFAULT_CHAT_TEMPLATE, materialize_preset


def resolve(name_or_path: str) -> str:
    """What from_pretrained gets: a preset's directory, a local directory or a hub id."""
    if name_or_path.startswith("preset:"):
        return str(materialize_preset(name_or_path.removeprefix("preset:")))
    if os.path.isabs(name_or_path) and not os.path.isdir(name_or_path):
        raise UserError(f"model.name_or_path: local directory {name_or_path} does not exist")
    return name_or_path


def _hub_error(cfg: ModelConfig, e: Exception) -> UserError:
    return UserError(
        f"model.name_or_path: could not load {cfg.name_or_path!r}: {type(e).__name__}: {e}. "
        "Give a local directory with a saved model, a reachable hub id, or preset:tiny-llama"
    )


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer with a pad token and a chat template, ready for every stage."""
    from transformers import AutoTokenizer

    source = resolve(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg, e) from None
    if cfg.chat_template:
        try:
            tok.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"model.chat_template: cannot read {cfg.chat_template}: {e.strerror}") from None
    elif not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.pad_token is None:  # padding positions are masked out of the loss
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.float32  # CPU-safe; the train stage picks bf16 autocast where supported
    return getattr(torch, name)


def load_model(cfg: ModelConfig, dtype: str | None = None, **extra: Any):
    """The causal LM through `AutoModelForCausalLM.from_pretrained`, whatever its source."""
    from transformers import AutoModelForCausalLM

    source = resolve(cfg.name_or_path)
    kwargs: dict[str, Any] = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=torch_dtype(dtype or cfg.dtype),
        **extra,
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg, e) from None


def fingerprint(tok) -> dict[str, Any]:
    """What must match between the data stage's shards and the model that trains on them."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: v for k, v in sorted(tok.special_tokens_map.items()) if isinstance(v, str)}
    special_ids = {k: tok.convert_tokens_to_ids(v) for k, v in specials.items()}
    parts = {
        "vocab_size": len(vocab),
        "vocab_hash": _sha(json.dumps(vocab, ensure_ascii=False)),
        "special_tokens": {k: [specials[k], special_ids[k]] for k in specials},
        "template_hash": _sha(tok.chat_template or ""),
    }
    parts["fingerprint"] = _sha(json.dumps(parts, sort_keys=True))
    return parts


def load_config(cfg: ModelConfig):
    """The model's transformers config (no weights): for checks made before any worker starts."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg, e) from None


def max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def describe(cfg: ModelConfig) -> list[str]:
    """What `raylab doctor CONFIG` prints about the model: source, size, tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = resolve(cfg.name_or_path)
    tok = load_tokenizer(cfg)
    lm = load_model(cfg)
    fp = fingerprint(tok)
    params = sum(p.numel() for p in lm.parameters())
    return [
        f"model: {cfg.name_or_path} -> {source}",
        f"  architecture {type(lm).__name__}, {params:,} parameters, dtype {next(lm.parameters()).dtype}",
        f"  tokenizer: {fp['vocab_size']} tokens, eos {tok.eos_token!r}, fingerprint {fp['fingerprint']}",
    ]
