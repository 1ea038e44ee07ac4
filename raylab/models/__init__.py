"""Models: presets, loading through `from_pretrained`, fine-tuning methods, inference, export.

    from raylab import models
    tok = models.load_tokenizer(cfg.model); lm = models.load_model(cfg.model)
    lm = models.load_for_training(cfg.model, device)          # the method applied (LoRA, ...)
    inf = models.load("acme-assistant/3")                       # registry ref, directory or hub id
    inf.model, inf.tokenizer, inf.kind, inf.base                # adapter onto its base, full, or base
    lm, tok = models.load_inference("runs/q/train/final")      # the same, as (model, tokenizer)
    models.export("runs/q", "out/", merge=True)                 # `raylab export`

Not a stage of its own: the data, train, eval and serve stages share it, so a model is
loaded one way whichever stage loads it.
"""

from __future__ import annotations

from raylab.models.export import export, final_dir
from raylab.models.generate import check_messages, greedy, greedy_ids, left_pad, prompt_ids
from raylab.models.inference import (
    Inference,
    base_of,
    identify,
    is_adapter,
    is_registry_ref,
    load,
    load_inference,
    locate,
    trained_from,
)
from raylab.models.inference import tokenizer as load_saved_tokenizer
from raylab.models.loading import (
    checkpoint_dtype,
    choose_dtype,
    describe,
    fingerprint,
    load_config,
    load_model,
    load_tokenizer,
    max_positions,
    resolve,
    resolved_dtype,
    skeleton,
    torch_dtype,
)
from raylab.models.methods import (
    apply_method,
    enable_activation_checkpointing,
    load_for_training,
    training_problems,
)
from raylab.models.presets import (
    DEFAULT_CHAT_TEMPLATE,
    PRESETS,
    build_base,
    build_byte_tokenizer,
    build_tiny_model,
    materialize_preset,
    train_corpus_tokenizer,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "PRESETS", "Inference", "apply_method", "base_of", "build_base",
    "build_byte_tokenizer", "build_tiny_model", "check_messages", "checkpoint_dtype", "choose_dtype", "describe",
    "enable_activation_checkpointing", "export", "final_dir", "fingerprint", "greedy", "greedy_ids", "identify",
    "is_adapter", "is_registry_ref",
    "left_pad", "load", "load_config", "load_for_training", "load_inference", "load_model", "load_saved_tokenizer",
    "load_tokenizer", "locate", "materialize_preset", "max_positions", "prompt_ids", "resolve", "resolved_dtype",
    "skeleton", "torch_dtype", "train_corpus_tokenizer", "trained_from", "training_problems",
]
