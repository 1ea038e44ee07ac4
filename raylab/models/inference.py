"""Loading a version for inference: the one way serve, eval, the gates and export load a
model, whether it is an adapter onto its base, a full fine-tune, or a plain base model.

    inf = load("acme-assistant/3")                     # a registry version, checksums verified
    inf = load("runs/quickstart/train/final")          # a trained final/ directory
    inf = load("runs/quickstart/train/final", base=True)  # what it was trained from
    inf.model, inf.tokenizer, inf.kind, inf.base       # kind: adapter | full | base
    model, tok = load_inference(path)                  # the older (model, tokenizer) form

What a REF is, decided by its form alone (never by what happens to exist on disk):
- `NAME/VERSION` (VERSION all digits) or `NAME@ALIAS`: a registry version, fetched through
  `registry.fetch`, which checks every file against the checksums recorded at registration;
- `preset:NAME`: a built-in tiny preset;
- anything else (an absolute path, `./acme/3`, `runs/q/train/final`, `~/m`, `org/model`):
  a local directory if one is there, else a Hugging Face hub id. A ref written as a path
  (starting with `/`, `./`, `../` or `~`) that does not exist is an error, not a hub id.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

# models sits above registry in the layers contract and registry imports nothing from
# models, so the resolution of registry refs can live here without a cycle.
from raylab import registry
from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.models.loading import resolve, torch_dtype

# The registry's own NAME/VERSION | NAME@ALIAS form (registry.versions.REF), repeated here
# only to decide registry-vs-path; registry.parse_ref still validates what is fetched.
_REGISTRY_REF = re.compile(r"^[^@/.~][^@/]*(?:/\d+|@[A-Za-z0-9_-]+)$")
_PATH_PREFIXES = ("/", "./", "../", "~")


@dataclass
class Inference:
    """A loaded version: the model in eval mode and the tokenizer to prompt it with."""

    model: Any
    tokenizer: Any
    path: str  # the local directory (or hub id) the weights came from
    kind: str  # "adapter" | "full" | "base"
    base: str  # the base model path or hub id (the path itself for a plain base model)
    ref: str | None = None  # the registry reference, when it was loaded from one


def is_registry_ref(ref: str) -> bool:
    return bool(_REGISTRY_REF.match(ref.strip()))


def is_adapter(path: str) -> bool:
    return os.path.exists(runs.model_file(path, runs.ADAPTER_CONFIG))


def base_of(path: str) -> str:
    """The base model an adapter directory was trained on."""
    return json.loads(storage.read_text(runs.model_file(path, runs.ADAPTER_CONFIG)))["base_model_name_or_path"]


def trained_from(path: str) -> str:
    """The base model a full fine-tune in `path` started from (its raylab_train.json)."""
    meta = runs.model_file(path, runs.TRAIN_META)
    if not os.path.exists(meta):
        raise UserError(f"{path}: no {runs.TRAIN_META}, so the base model it was trained from is unknown")
    found = json.loads(storage.read_text(meta))
    return found.get("base_model_path") or found["base_model"]


def identify(path: str) -> tuple[str, str]:
    """(kind, base) of a local directory or hub id: ("adapter", its base) for a PEFT adapter,
    ("full", what it was trained from) for a trained full model (it has raylab_train.json),
    else ("base", the path itself)."""
    if is_adapter(path):
        return "adapter", base_of(path)
    if os.path.exists(runs.model_file(path, runs.TRAIN_META)):
        return "full", trained_from(path)
    return "base", path


def locate(ref: str, store: registry.Store | None = None) -> str:
    """The local directory (or hub id) a REF names; a registry version is fetched and its
    checksums verified (registry.IntegrityError on any mismatch). `store` defaults to the
    registry `registry.open_store()` finds ($MLFLOW_TRACKING_URI, else $RAYLAB_HOME's)."""
    ref = str(ref)
    if is_registry_ref(ref):
        return registry.fetch(store or registry.open_store(), ref.strip())
    if ref.startswith("preset:"):
        return resolve(ref)
    expanded = os.path.expanduser(ref)
    if os.path.isdir(expanded):
        return expanded
    if ref.startswith(_PATH_PREFIXES) or os.path.exists(expanded):
        raise UserError(f"model {ref!r}: no model directory there; expected a trained final/ directory, a Hugging "
                        "Face model directory, a hub id, or a registry reference NAME/VERSION or NAME@ALIAS")
    return ref  # a hub id: from_pretrained fetches it


def load(ref: str, *, base: bool = False, dtype: str = "float32", tokenizer_path: str | None = None,
         store: registry.Store | None = None, with_tokenizer: bool = True) -> Inference:
    """Load REF (see the module docstring for its forms) for inference. An adapter is put
    onto its base; `base=True` loads the model it was trained from instead (a plain base
    model: itself), with REF's tokenizer (the one its data was encoded with) unless
    `tokenizer_path` names another. `with_tokenizer=False` loads
    the weights only (a serving replica's shared base model, whose directory may hold none)."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in a stage's log
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft on transformers 5
    path = locate(ref, store)
    kind, base_path = identify(path)
    weights = base_path if (base or kind == "adapter") else path
    try:
        with storage.plain_dir(weights) as src:  # sealed files (governance.encryption) opened in memory
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype(dtype))
        model.config.name_or_path = model.name_or_path = weights  # not the private copy, gone after loading
    except OSError as e:
        raise UserError(f"model {ref!r}: could not load {weights!r}: {e}") from None
    if kind == "adapter" and not base:
        from peft import PeftModel

        with storage.plain_dir(path) as src:
            model = PeftModel.from_pretrained(model, src)
    tok = tokenizer(tokenizer_path or path) if with_tokenizer else None
    return Inference(model.eval(), tok, path, "base" if base else kind, base_path,
                     ref if is_registry_ref(ref) else None)


def load_inference(path: str, tokenizer_path: str | None = None, dtype: str = "float32", base: bool = False):
    """(model in eval mode, tokenizer) of a local directory or hub id: `load` for callers that
    hold a path (a relative path shaped like NAME/VERSION is still taken as a path here)."""
    if not os.path.isabs(path) and is_registry_ref(path) and os.path.isdir(path):
        path = os.path.join(".", path)
    inf = load(path, base=base, dtype=dtype, tokenizer_path=tokenizer_path)
    return inf.model, inf.tokenizer


def tokenizer(path: str):
    """A saved tokenizer (with its chat template: its own, else raylab's default, as for
    training), padding with end-of-sequence if it has no pad."""
    from transformers import AutoTokenizer

    from raylab.models.presets import DEFAULT_CHAT_TEMPLATE

    with storage.plain_dir(path) as src:
        tok = AutoTokenizer.from_pretrained(src)
    if not tok.chat_template:  # a plain base model served as it is (`raylab serve --model DIR`)
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
