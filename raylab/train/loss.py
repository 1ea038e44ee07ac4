"""Training on the data stage's packed rows: masks, the token loss (the `cross_entropy`
objective; objectives.py is the seam for others), one optimizer step with gradient
accumulation, and evaluation. Pure torch; the Ray Train loop in
`raylab/train/loop.py` calls these, and the unit tests call them directly.

Packed rows hold several documents (see `raylab/data/packing.py`). A token may attend only to
earlier tokens of its own document, and `position_ids` restart at 0 for each document, so a
packed row computes exactly what the documents would alone. How the boundaries reach the
attention kernel depends on the kernel (`packs_by_positions`):

- `eager` and `sdpa` get `block_causal_mask`, a dense `[batch, 1, seq, seq]` mask built here
  from `segment_ids` (boolean for SDPA). transformers would build the same dense mask from
  the restarting positions if given none (a packed step's peak memory on CPU measured the
  same either way, benchmarks/bench_packing.py), but a model with its own code
  (`trust_remote_code`) may not.
- A model with sliding-window layers (Mistral, Gemma 2/3) whose rows are longer than its
  window gets the positions only with every kernel: the mask built here has no window.
- `flash_attention_2` and `flex_attention` get the positions only: transformers turns them
  into what those kernels take (FlashAttention-2's variable-length path needs no mask, flex
  attention a sparse block mask; `masking_utils.find_packed_sequence_indices`), so no
  O(seq^2) mask exists. That is the point of those kernels for long packed rows.

The loss of an optimizer step is the mean over every target token of the accumulation
window on every worker: each micro-batch contributes its summed token loss divided by that
global count (times the world size, since DDP and FSDP average gradients). Averaging per
micro-batch instead would weight a short micro-batch's tokens more than a long one's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raylab.train import sharding

IGNORE = -100


def block_causal_mask(segment_ids: torch.Tensor, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, seq, seq] mask: query i sees key j iff same document and j <= i.

    Padding (segment 0) sees only itself, so no row is fully masked (a softmax over nothing
    is NaN, and NaN in a padding row still poisons the weight gradients). Eager attention
    adds the mask to the scores (0 / dtype-min); SDPA takes a boolean (True = attend)."""
    seg = segment_ids
    n = seg.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril_()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    allowed = (same & causal) | torch.eye(n, dtype=torch.bool, device=seg.device)
    allowed = allowed[:, None]
    if attn_impl == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return allowed


@dataclass
class Sums:
    """Summed token loss, target count and correct argmax predictions (local to a worker)."""

    loss: torch.Tensor
    targets: int
    correct: int


def _config(model):
    return getattr(model, "config", None) or model.module.config  # DDP keeps it on .module


def attn_impl_of(model) -> str:
    return getattr(_config(model), "_attn_implementation", None) or "eager"


def sliding_window(config) -> int | None:
    """The attention window of a model with sliding-window layers (Mistral, Gemma 2/3, ...)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    return window if window and (layer_types is None or "sliding_attention" in layer_types) else None


def packs_by_positions(attn_impl: str, config=None, seq_len: int = 0) -> bool:
    """Whether packed rows reach this attention kernel as restarting positions only (module
    docstring): flash and flex attention always; eager and SDPA only for a model with
    sliding-window layers and rows longer than its window, since the block mask built here
    has no window, and transformers builds each layer type's mask from the positions."""
    if attn_impl not in ("eager", "sdpa"):
        return True
    window = sliding_window(config) if config is not None else None
    return window is not None and seq_len > window


def forward(model, batch: dict[str, torch.Tensor], attn_impl: str, mask_dtype=torch.float32):
    """The model's outputs on a packed micro-batch: per-document positions, and the
    block-causal mask for the kernels that take one (module docstring). `use_cache=False`
    matters beyond memory: transformers looks for packed positions only without a KV cache."""
    by_positions = packs_by_positions(attn_impl, _config(model), batch["input_ids"].shape[-1])
    mask = None if by_positions else block_causal_mask(batch["segment_ids"], attn_impl, mask_dtype)
    return model(input_ids=batch["input_ids"].long(), attention_mask=mask, position_ids=batch["position_ids"].long(),
                 use_cache=False)


def token_sums(batch: dict[str, torch.Tensor], outputs) -> Sums:
    """Next-token cross-entropy summed (not averaged) over the target tokens, and their count
    (the `cross_entropy` objective, raylab/train/objectives.py). Logits are cast to float32."""
    logits = outputs.logits[:, :-1].float()
    target = batch["labels"].long()[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return Sums(loss, int((target != IGNORE).sum()), 0)


def correct_predictions(batch: dict[str, torch.Tensor], outputs) -> int:
    """Target tokens whose argmax prediction is right (token accuracy's numerator)."""
    target = batch["labels"].long()[:, 1:]
    return int(((outputs.logits[:, :-1].float().argmax(-1) == target) & (target != IGNORE)).sum())


def forward_sums(model, batch: dict[str, torch.Tensor], attn_impl: str, mask_dtype=torch.float32,
                 accuracy: bool = True, objective=None) -> Sums:
    """One forward pass; the objective's loss summed (not averaged) over target tokens
    (`objective`: raylab/train/objectives.py; None is next-token cross-entropy), and with
    `accuracy` the correct predictions. Logits are only ever held for one micro-batch."""
    outputs = forward(model, batch, attn_impl, mask_dtype)
    sums = token_sums(batch, outputs) if objective is None else objective.loss(batch, outputs)
    if accuracy:
        sums.correct = correct_predictions(batch, outputs)
    return sums


def collate(batch: dict, all_tokens: bool = False) -> dict:
    """Ray Data numpy batch (fixed-length list columns) -> int tensors. `all_tokens`
    (train.loss_on: all): every token of a document is a target, prompts included, except
    its first (never predicted from the previous document) and padding."""
    import numpy as np

    out = {k: torch.from_numpy(np.stack(v) if v.dtype == object else np.array(v)) for k, v in batch.items()}
    if all_tokens:
        keep = (out["segment_ids"] > 0) & (out["position_ids"] > 0)
        out["labels"] = torch.where(keep, out["input_ids"], torch.full_like(out["input_ids"], IGNORE))
    return out


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def all_reduce(values: list[float], device) -> list[float]:
    """Sum across workers (a no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(model, optimizer, window: list[dict], *, device, world_size: int, attn_impl: str,
               max_grad_norm: float | None, bf16: bool = False, objective=None) -> dict[str, float]:
    """Forward/backward every micro-batch of the window, clip, step. Returns the window's
    token-mean loss (over all workers), grad norm, and target/real token counts."""
    local_targets = sum(count_targets(mb) for mb in window)
    global_targets = all_reduce([float(local_targets)], device)[0]
    scale = world_size / max(global_targets, 1.0)
    loss_sum = 0.0
    for i, mb in enumerate(window):
        last = i == len(window) - 1
        # Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) until the window's last micro-batch.
        with sharding.gradient_sync(model, last):
            with autocast(device, bf16):
                sums = forward_sums(model, mb, attn_impl, accuracy=False, objective=objective)
            (sums.loss * scale).backward()
        loss_sum += float(sums.loss.detach())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already reduced over the shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    real_tokens = sum(int(mb["num_tokens"].sum()) for mb in window)
    loss_total, real_total = all_reduce([loss_sum, float(real_tokens)], device)
    return {"loss": loss_total / max(global_targets, 1.0), "grad_norm": float(grad_norm),
            "targets": int(global_targets), "real_tokens": int(real_total)}


def _lockstep(model, batches, device):
    """`batches`, while every worker runs the same number of forwards: a sharded (FSDP)
    model's forward all-gathers each layer, so a worker out of batches keeps joining with a
    one-token stand-in forward (its output unused) until no worker has one left."""
    stand_in = torch.zeros((1, 1), dtype=torch.long, device=device)
    it = iter(batches)
    while True:
        batch = next(it, None)
        if all_reduce([0.0 if batch is None else 1.0], device)[0] == 0:
            return
        if batch is None:
            model(input_ids=stand_in)
        else:
            yield batch


@torch.no_grad()
def evaluate(model, batches, *, device, attn_impl: str, bf16: bool = False, objective=None,
             lockstep: bool = False) -> dict[str, float]:
    """Loss, perplexity and token accuracy over `batches` (summed, then reduced across
    workers); one micro-batch of logits at a time. `lockstep`: a sharded model (_lockstep)."""
    was_training = model.training
    model.eval()
    loss = targets = correct = 0.0
    for batch in _lockstep(model, batches, device) if lockstep else batches:
        with autocast(device, bf16):
            sums = forward_sums(model, batch, attn_impl, objective=objective)
        loss += float(sums.loss)
        targets += sums.targets
        correct += sums.correct
    loss, targets, correct = all_reduce([loss, targets, correct], device)
    model.train(was_training)
    if targets == 0:
        return {"val_loss": float("nan"), "val_perplexity": float("nan"), "val_token_accuracy": float("nan")}
    mean = loss / targets
    return {"val_loss": mean, "val_perplexity": math.exp(min(mean, 50.0)), "val_token_accuracy": correct / targets}


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of train.lr at `step`: linear warmup, then cosine/linear decay to 0 or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
