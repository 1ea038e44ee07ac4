"""`train.strategy`: how the model is spread over the Ray Train workers.

    raylab train configs/quickstart.yaml train.num_workers=2 train.strategy=fsdp

- `ddp` (the default): `ray.train.torch.prepare_model`, DistributedDataParallel. Every worker
  holds the whole model, its gradients and its optimizer state; gradients are all-reduced.
- `fsdp`: FSDP2, `torch.distributed.fsdp.fully_shard` on every decoder layer and then on the
  root. Parameters, gradients and AdamW state are split across the workers (each holds
  1/world of them); a layer's parameters are all-gathered just before its forward and
  backward and freed after, gradients are reduce-scattered (averaged, as DDP averages).

Why FSDP2 in the loop rather than Ray's `prepare_model(parallel_strategy="fsdp")`: Ray 2.60
wraps with FSDP1 (`FullyShardedDataParallel`, flat parameters), whose mixed frozen/trainable
parameters (LoRA, hybrid) need `use_orig_params` and whose state-dict types are a separate
API; FSDP2 shards each parameter as a DTensor, handles frozen and trainable parameters in one
unit, and its `torch.distributed.checkpoint.state_dict` helpers gather a full state dict. It
runs on CPU workers over gloo (torch 2.13, checked with two processes: sharded forward and
backward, gradient clipping, the full model and optimizer state dicts gathered and loaded).

Checkpoints stay what DDP writes: the model is gathered to full tensors on rank 0 (every rank
joins the all-gathers) and saved in Hugging Face / peft format, its tensor shapes checked
against the model's (unsharded) shapes before writing; AdamW's state is gathered to a full,
parameter-name-keyed dict (`optimizer.pt`) and re-sharded on resume, so a checkpoint does not
depend on the world size. Weights are restored into the model before it is sharded.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


def prepare(model, strategy: str, device):
    """The model as the workers train it: DDP-wrapped, or sharded in place (FSDP2)."""
    if strategy == "fsdp":
        return shard(model, device)
    import ray.train.torch

    return ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU) when world > 1


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers names in `_no_split_modules`
    (LlamaDecoderLayer, ...), each one FSDP unit so that one layer's full parameters exist at a time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model, device):
    """fully_shard every decoder layer, then the root (embeddings, final norm, output head; a
    tied head stays with its embedding in the root unit). In place: returns the same module."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = decoder_layers(model)
    if not layers:  # still shards parameters and optimizer state, but gathers the whole model per forward
        log.warning("train.strategy=fsdp: the model names no decoder-layer class (_no_split_modules); "
                    "sharding it as one unit")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model, sync: bool):
    """A context for one micro-batch: gradients are exchanged only on the window's last one."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload: the full tensors land on rank 0's CPU only (other ranks get {}), one
    # parameter at a time, so no rank holds a second full copy on its accelerator.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on rank 0, {} on the others. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_options())
    if full:
        check_full(model_shapes(model), full)
    return full


def model_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's logical shape: a sharded parameter (DTensor) reports its global shape."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_full(expected: dict[str, tuple[int, ...]], full: dict[str, torch.Tensor]) -> None:
    """Raise if the gathered state dict is not the whole model: a missing entry, or a tensor
    with another shape than the model's (a shard saved as if it were the weight, the bug other
    stacks shipped). A raylab bug, not a user error."""
    wrong = {k: (tuple(v.shape), expected.get(k)) for k, v in full.items() if tuple(v.shape) != expected.get(k)}
    missing = sorted(set(expected) - set(full))
    if wrong or missing:
        raise RuntimeError(f"the gathered FSDP state dict does not match the model: shapes (gathered, model) {wrong}, "
                           f"missing {missing[:10]}: a bug in raylab's sharded checkpointing, please report it")


def full_optimizer_state(model, optimizer) -> dict:
    """AdamW's full state keyed by parameter name on rank 0, {} on the others. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(model, optimizer, full: dict) -> None:
    """Shard a full optimizer state (what full_optimizer_state saved) into this worker's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=full, options=StateDictOptions(full_state_dict=True))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This worker's part of a (possibly sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t
