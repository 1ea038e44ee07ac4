"""Training checkpoints: everything a resumed run needs to continue rather than restart.

A checkpoint directory (reported through `ray.train.report`, which merges every worker's
files into one directory in `<output_dir>/train/`):

    model/               the weights in Hugging Face format: a peft adapter
                         (adapter_config.json + adapter_model.safetensors; hybrid mode's
                         fully trained modules inside it) or the full model
    optimizer.pt         AdamW state            (rank 0; DDP keeps it identical on all ranks)
    scheduler.pt         LR scheduler state     (rank 0)
    state.json           step, epoch, micro-batches consumed in the epoch, tokens, metric
                         history, best val loss, early-stopping count, world size
    rng_rank<R>.pt       each worker's torch / numpy / python RNG state

Data position: Ray Data has no seek, so a resumed run re-reads the epoch in the same order
(`preserve_order` plus a seeded local shuffle make it deterministic for a fixed world size)
and skips the micro-batches already consumed. With a different world size (elastic
training) the skip is converted through rows consumed, which is approximate.
"""

from __future__ import annotations

import glob
import json
import os
import random

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from raylab.core import storage

STATE = "state.json"
MODEL_DIR = "model"  # the weights inside a checkpoint, in Hugging Face format


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def is_peft(model) -> bool:
    return hasattr(unwrap(model), "peft_config")


def expected_tensors(model) -> dict[str, tuple[int, ...]]:
    """Names and shapes save_pretrained must write for this model (adapter or full)."""
    m = unwrap(model)
    if is_peft(m):
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(m)
    else:
        sd = m.state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def saved_tensors(path: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                out[k] = tuple(s.get_slice(k).get_shape())
    return out


def save_model(model, path: str) -> None:
    """save_pretrained, then check every written tensor against the live model: a partial
    or wrongly shaped save (the classic sharded-adapter bug) fails here, not at load time."""
    m = unwrap(model)
    storage.save_pretrained(m, path, safe_serialization=True)
    expected, saved = expected_tensors(m), saved_tensors(path)
    wrong = {k: (saved[k], expected.get(k)) for k in saved if saved[k] != expected.get(k)}
    missing = set(expected) - set(saved)
    if is_peft(m):
        bad_missing = missing
    else:  # full models may drop tied copies (lm_head tied to the embeddings)
        tied = {k for k in missing if _is_tied(m, k)}
        bad_missing = missing - tied
    if wrong or bad_missing:
        raise RuntimeError(f"saved model at {path} does not match the model: wrong shapes {wrong}, missing {sorted(bad_missing)[:10]}")


def _is_tied(m, key: str) -> bool:
    params = dict(m.named_parameters(remove_duplicate=False))
    target = params.get(key)
    return target is not None and any(p is target for k, p in params.items() if k != key)


def load_model_weights(model, path: str) -> None:
    """Load what save_model wrote back into the live model (same method and shapes)."""
    from safetensors.torch import load_file

    m = unwrap(model)
    tensors = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(f))
    if is_peft(m):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(m, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint {path} has tensors the model lacks: {unexpected[:5]}")
    else:
        result = m.load_state_dict(tensors, strict=False)
        missing = [k for k in result.missing_keys if not _is_tied(m, k)]
        if result.unexpected_keys or missing:
            raise RuntimeError(f"checkpoint {path}: unexpected {result.unexpected_keys[:5]}, missing {missing[:5]}")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save(directory: str, *, rank: int, model, optimizer, scheduler, state: dict) -> None:
    """Write this worker's part of a checkpoint into `directory`."""
    storage.save_torch(rng_state(), os.path.join(directory, f"rng_rank{rank}.pt"))
    if rank != 0:
        return
    save_model(model, os.path.join(directory, MODEL_DIR))
    storage.save_torch(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    storage.save_torch(scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
    storage.write_text(os.path.join(directory, STATE), json.dumps(state, allow_nan=True))


def restore(directory: str, *, rank: int, world_size: int, model, optimizer, scheduler, seed: int) -> dict:
    """Load a checkpoint into the live objects; returns its state.json."""
    state = read_state(directory)
    load_model_weights(model, os.path.join(directory, MODEL_DIR))
    optimizer.load_state_dict(storage.load_torch(os.path.join(directory, "optimizer.pt")))
    scheduler.load_state_dict(storage.load_torch(os.path.join(directory, "scheduler.pt")))
    rng = os.path.join(directory, f"rng_rank{rank}.pt")
    if state.get("world_size") == world_size and storage.exists(rng):
        set_rng_state(storage.load_torch(rng))
    else:  # another world size: fresh, still deterministic, streams per rank
        seed_all(seed + 7919 * rank + state["step"])
    return state


def read_state(directory: str) -> dict:
    return json.loads(storage.read_text(os.path.join(directory, STATE)))
