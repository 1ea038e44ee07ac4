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
from raylab.core import storage
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
        with storage.plain_dir(source) as src:  # a run's sealed tokenizer (governance.encryption)
            tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
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
    """The torch dtype of an explicit name; `auto` here (a caller that did not resolve it
    with `choose_dtype`, e.g. an inference load on CPU) is float32."""
    import torch

    if name == "auto":
        return torch.float32
    return getattr(torch, name)


HALF = ("bfloat16", "float16")
# Why `auto` is float32 on CPU even for a bf16 checkpoint: CPU matmuls in bf16/fp16 are
# several times slower than fp32 without AMX/AVX512-BF16, and some ops have no half kernels there.
CPU_REASON = "CPU: bf16/fp16 matmuls are slow or unsupported for some ops there; set model.dtype: bfloat16 to force it"


def checkpoint_dtype(config) -> str | None:
    """The dtype a checkpoint was saved in (its config's `dtype`, `torch_dtype` before
    transformers 5), as a name; None when the config does not say."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return name if name in ("float32", *HALF) else None


def choose_dtype(requested: str, device_type: str, checkpoint: str | None, bf16_supported: bool = True) -> tuple[str, str]:
    """(dtype name, why) the weights load in: an explicit `model.dtype` is honoured; `auto` is
    the checkpoint's own dtype (transformers' `dtype="auto"`) on a GPU, float32 on a GPU
    without bf16 for a bf16 checkpoint, and float32 on CPU."""
    if requested != "auto":
        return requested, "model.dtype"
    saved = checkpoint or "unknown"
    if device_type != "cuda":
        return "float32", f"auto on {CPU_REASON} (checkpoint: {saved})"
    if checkpoint is None:
        return "float32", "auto: the checkpoint does not record its dtype"
    if checkpoint == "bfloat16" and not bf16_supported:
        return "float32", "auto: the checkpoint is bfloat16 but this GPU has no bf16 support"
    return checkpoint, "auto: the checkpoint's own dtype"


def resolved_dtype(cfg: ModelConfig, device=None) -> tuple[str, str]:
    """`choose_dtype` for the config's model on `device` (a torch device or None: CPU); reads
    the model's config only (no weights) and only for `auto`."""
    device_type = getattr(device, "type", None) or (str(device) if device is not None else "cpu")
    if cfg.dtype != "auto":
        return choose_dtype(cfg.dtype, device_type, None)
    bf16 = True
    if device_type == "cuda":
        import torch

        bf16 = torch.cuda.is_bf16_supported()
    return choose_dtype("auto", device_type, checkpoint_dtype(load_config(cfg)), bf16)


def load_model(cfg: ModelConfig, dtype: str | None = None, device=None, **extra: Any):
    """The causal LM through `AutoModelForCausalLM.from_pretrained`, whatever its source, in
    `dtype` or else the dtype `resolved_dtype` picks for `device` (None: CPU)."""
    from transformers import AutoModelForCausalLM

    source = resolve(cfg.name_or_path)
    kwargs: dict[str, Any] = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=torch_dtype(dtype or resolved_dtype(cfg, device)[0]),
        **extra,
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        with storage.plain_dir(source) as src:
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        # An adapter records its base by this name: the source, not the private copy (gone now).
        model.config.name_or_path = model.name_or_path = source
        return model
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
        with storage.plain_dir(resolve(cfg.name_or_path)) as src:
            return AutoConfig.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
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


def skeleton(cfg: ModelConfig, config=None):
    """The model built on the meta device from its config: module names, shapes and
    parameter counts, no memory and no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config if config is not None else load_config(cfg)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except ValueError as e:  # a config no causal-LM class takes (an encoder, a vision model)
        raise UserError(f"model.name_or_path: {cfg.name_or_path} is a {config.model_type} model, not a causal "
                        f"language model raylab can fine-tune ({e})") from None


def describe(cfg: ModelConfig, gpus_per_worker: float = 0.0) -> list[str]:
    """What `raylab doctor CONFIG` prints about the model: source, size (from its config, on
    the meta device), the dtype its weights load in on the train workers, the tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = resolve(cfg.name_or_path)
    tok = load_tokenizer(cfg)
    config = load_config(cfg)
    lm = skeleton(cfg, config)
    fp = fingerprint(tok)
    params = sum(p.numel() for p in lm.parameters())
    saved = checkpoint_dtype(config)
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    dtype, why = choose_dtype(cfg.dtype, device, saved)
    where = "GPU workers (bf16 where the GPU supports it)" if device == "cuda" else "CPU workers"
    return [
        f"model: {cfg.name_or_path} -> {source}",
        f"  architecture {type(lm).__name__}, {params:,} parameters (from its config), checkpoint dtype {saved or 'not recorded'}",
        f"  dtype: model.dtype {cfg.dtype} -> {dtype} on {where} ({why})",
        f"  tokenizer: {fp['vocab_size']} tokens, eos {tok.eos_token!r}, fingerprint {fp['fingerprint']}",
    ]
