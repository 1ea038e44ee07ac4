"""Loading a trained model for inference: an adapter onto its base, a full fine-tune, or a
base model. Shared by eval, the gates, serving and export, so all of them load a version
the same way.

    model, tok = load("runs/quickstart/train/final")          # adapter or full model
    base, tok = load("runs/quickstart/train/final", base=True)  # what it was trained from
"""

from __future__ import annotations

import json
import os

from raylab.core import runs
from raylab.errors import UserError


def is_adapter(path: str) -> bool:
    return os.path.exists(runs.model_file(path, runs.ADAPTER_CONFIG))


def base_of(path: str) -> str:
    """The base model an adapter directory was trained on."""
    with open(runs.model_file(path, runs.ADAPTER_CONFIG)) as f:
        return json.load(f)["base_model_name_or_path"]


def trained_from(path: str) -> str:
    """The base model a full fine-tune in `path` started from (its raylab_train.json)."""
    meta = runs.model_file(path, runs.TRAIN_META)
    if not os.path.exists(meta):
        raise UserError(f"{path}: no {runs.TRAIN_META}, so the base model it was trained from is unknown")
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


