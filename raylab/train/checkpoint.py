"""Training checkpoints: everything a resumed run needs to continue rather than restart.

A checkpoint directory (reported through `ray.train.report`, which merges every worker's
files into one directory in `<output_dir>/train/`):

    model/               the weights in Hugging Face format: a peft adapter
                         (adapter_config.json + adapter_model.safetensors; hybrid mode's
                         fully trained modules inside it) or the full model
    optimizer.pt         AdamW state            (rank 0; DDP keeps it identical on all ranks;
                         under train.strategy=fsdp the full state gathered from the shards,
                         keyed by parameter name: sharding.py)
    scheduler.pt         LR scheduler state     (rank 0)
    state.json           step, epoch, micro-batches consumed in the epoch, tokens, metric
                         history, best val loss, early-stopping count, world size
    rng_rank<R>.pt       each worker's torch / numpy / python RNG state
    manifest_rank<R>.json  sha256 of every file worker R wrote (read back through
                         core.storage, so over the plaintext), and rank 0's the world size

Integrity: each worker writes its manifest last, so a checkpoint is complete only when rank
0's manifest and one per rank it names are there; `verify` checks every listed file. A
resumed run verifies the checkpoint Ray Train hands it and, if that one is damaged or
incomplete, falls back to the newest good checkpoint beside it (loop.resume_point).

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
import re

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from raylab.core import storage
from raylab.errors import UserError
from raylab.train import sharding

STATE = "state.json"
MANIFEST = "manifest_rank{rank}.json"
MODEL_DIR = "model"  # the weights inside a checkpoint, in Hugging Face format


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def is_peft(model) -> bool:
    return hasattr(unwrap(model), "peft_config")


def expected_tensors(model) -> dict[str, tuple[int, ...]]:
    """Names and shapes save_pretrained must write for this model (adapter or full), with no
    collective: save_model runs on rank 0 alone. peft picks the adapter's entries from empty
    meta tensors of the entries' global shapes (a sharded parameter's DTensor reports its
    global shape): handed the model's own DTensors, peft >= 0.22 gathers them, and that
    all-gather, made by one rank, hung a two-worker FSDP run at its first checkpoint."""
    m = unwrap(model)
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in m.state_dict().items()}
    if is_peft(m):
        from peft import get_peft_model_state_dict

        shapes = get_peft_model_state_dict(m, state_dict=shapes, save_embedding_layers=_save_embeddings(m))
    return {k: tuple(v.shape) for k, v in shapes.items()}


def _save_embeddings(m) -> bool:
    """peft's `save_embedding_layers` as its "auto" decides it, without the part that re-reads
    the base model's config.json by path to see whether the vocabulary was resized (a sealed
    file under governance.encryption): raylab never resizes embeddings, so only a targeted
    embedding layer is saved."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    targets = m.peft_config[m.active_adapter].target_modules
    return not isinstance(targets, str) and any(k in targets for k in EMBEDDING_LAYER_NAMES)


def saved_tensors(path: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    with storage.plain_dir(path) as plain:
        for f in sorted(glob.glob(os.path.join(plain, "*.safetensors"))):
            with safe_open(f, "pt") as s:
                for k in s.keys():
                    out[k] = tuple(s.get_slice(k).get_shape())
    return out


def save_model(model, path: str, full: dict | None = None) -> None:
    """save_pretrained, then check every written tensor against the live model: a partial
    or wrongly shaped save (the classic sharded-adapter bug) fails here, not at load time.
    `full`: a sharded model's gathered state dict (sharding.full_state_dict), saved in its
    place; the expected shapes are the model's global ones either way."""
    m = unwrap(model)
    kwargs = {"save_embedding_layers": _save_embeddings(m)} if is_peft(m) else {}
    if full is not None:
        kwargs["state_dict"] = full
    elif sharding.is_sharded(m):
        raise RuntimeError("save_model: a sharded (FSDP) model needs its gathered state dict: a raylab bug")
    storage.save_pretrained(m, path, safe_serialization=True, **kwargs)
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
    with storage.plain_dir(path) as plain:
        for f in sorted(glob.glob(os.path.join(plain, "*.safetensors"))):
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
    """Write this worker's part of a checkpoint into `directory` (its own, empty: Ray Train
    merges the workers' directories), its manifest last. A sharded model is first gathered
    (every rank must call this then), so rank 0 writes what DDP would."""
    full = optim = None
    if sharding.is_sharded(model):
        full, optim = sharding.full_state_dict(model), sharding.full_optimizer_state(model, optimizer)
    storage.save_torch(rng_state(), os.path.join(directory, f"rng_rank{rank}.pt"))
    if rank == 0:
        save_model(model, os.path.join(directory, MODEL_DIR), full)
        storage.save_torch(optim if optim is not None else optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        storage.save_torch(scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
        storage.write_text(os.path.join(directory, STATE), json.dumps(state, allow_nan=True))
    write_manifest(directory, rank=rank, world_size=state["world_size"])


def write_manifest(directory: str, *, rank: int, world_size: int) -> None:
    """sha256 of every file this worker wrote into `directory`, read back through storage."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if not re.fullmatch(r"manifest_rank\d+\.json", rel):
                files[rel] = storage.sha256(path)
    body = {"rank": rank, "files": dict(sorted(files.items()))} | ({"world_size": world_size} if rank == 0 else {})
    storage.write_text(os.path.join(directory, MANIFEST.format(rank=rank)), json.dumps(body, indent=1))


def problems(directory: str) -> list[str]:
    """What is wrong with a checkpoint directory (empty: complete and unchanged): a missing
    manifest (the checkpoint was never completed, or predates checksums), a listed file
    missing or with another sha256."""
    head = os.path.join(directory, MANIFEST.format(rank=0))
    if not os.path.exists(head):
        return [f"no {MANIFEST.format(rank=0)} (an incomplete checkpoint, or one written without checksums)"]
    manifests = [json.loads(storage.read_text(head))]
    out = []
    for r in range(1, int(manifests[0].get("world_size", 1))):
        path = os.path.join(directory, MANIFEST.format(rank=r))
        if os.path.exists(path):
            manifests.append(json.loads(storage.read_text(path)))
        else:
            out.append(f"no {MANIFEST.format(rank=r)} (rank {r} never finished its part)")
    for m in manifests:
        for rel, expected in m["files"].items():
            path = os.path.join(directory, rel)
            if not os.path.exists(path):
                out.append(f"{rel} is missing")
            elif (actual := storage.sha256(path)) != expected:
                out.append(f"{rel} has sha256 {actual[:12]}, not the recorded {expected[:12]}")
    return out


def restore_weights(directory: str, model) -> None:
    """A checkpoint's weights into the model, before it is wrapped or sharded (they are full tensors)."""
    load_model_weights(model, os.path.join(directory, MODEL_DIR))


def restore(directory: str, *, rank: int, world_size: int, model, optimizer, scheduler, seed: int) -> dict:
    """Load the rest of a checkpoint (restore_weights has loaded the model) into the live
    objects: the optimizer (re-sharded for an FSDP model), scheduler and RNG; returns its state.json."""
    state = read_state(directory)
    strategy = "fsdp" if sharding.is_sharded(model) else "ddp"
    if state.get("strategy", "ddp") != strategy:  # optimizer.pt's layout differs (by parameter name vs index)
        raise UserError(f"checkpoint {directory} was written with train.strategy={state.get('strategy', 'ddp')}; "
                        f"resume it with that train.strategy, or start over with train.resume=false")
    saved_optimizer = storage.load_torch(os.path.join(directory, "optimizer.pt"))
    if strategy == "fsdp":
        sharding.load_optimizer_state(model, optimizer, saved_optimizer)
    else:
        optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(storage.load_torch(os.path.join(directory, "scheduler.pt")))
    rng = os.path.join(directory, f"rng_rank{rank}.pt")
    if state.get("world_size") == world_size and storage.exists(rng):
        set_rng_state(storage.load_torch(rng))
    else:  # another world size: fresh, still deterministic, streams per rank
        seed_all(seed + 7919 * rank + state["step"])
    return state


def read_state(directory: str) -> dict:
    return json.loads(storage.read_text(os.path.join(directory, STATE)))


def listed(train_dir: str) -> list[dict]:
    """The complete checkpoints a run keeps under `train_dir` (local or URI), oldest step
    first: {"path", "step", "epoch", "metrics": the metrics row at its step (metrics.jsonl's
    shape; the last logged row at or before it)}. A directory without rank 0's manifest (a
    checkpoint being written, or never finished) is left out; files are not re-hashed here
    (`problems` does that when a run resumes from one). What the fine-tuning API lists as a
    job's `ftckpt_` checkpoints."""
    from pyarrow import fs

    fsys, path = storage.filesystem(train_dir)
    if fsys.get_file_info(path).type == fs.FileType.NotFound:
        return []
    out = []
    for info in fsys.get_file_info(fs.FileSelector(path, recursive=False)):
        if info.type != fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        directory = os.path.join(train_dir, info.base_name)  # a checkpoint's files, as `problems` reads them
        if not storage.exists(os.path.join(directory, MANIFEST.format(rank=0))):
            continue
        state = read_state(directory)
        rows = [r for r in state.get("history", []) if r.get("step", 0) <= state["step"]]
        out.append({"path": directory, "step": int(state["step"]), "epoch": state.get("epoch"),
                    "metrics": rows[-1] if rows else {}})
    return sorted(out, key=lambda c: c["step"])

