"""The training loop: `train_loop_per_worker` runs on every Ray Train worker.

The objective (packed-row masks, token-normalised gradient accumulation, evaluation) is in
loss.py, checkpoint contents and the data-position rule in checkpoint.py, FLOPs/MFU in
metrics.py; the driver (driver.py) builds the trainer and hands this function its
`loop_config`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from raylab.config import RaylabConfig
from raylab.core import logs, storage

VAL_CACHE_BYTES = 256 << 20  # a val split up to this size stays in each worker's memory
TRAIN_CACHE_BYTES = 256 << 20  # so does a train shard up to this size (per worker)

log = logging.getLogger(__name__)


@dataclass
class Steps:
    rows_per_worker: int
    micro_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total: int


def plan_steps(train_rows: int, world: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None) -> Steps:
    """Optimizer steps for this world size. Shards are equal (Ray drops the remainder rows),
    so every worker takes the same number of steps and reports the same number of times."""
    rows = train_rows // world
    micro = math.ceil(rows / batch_size)
    per_epoch = max(1, math.ceil(micro / grad_accum))
    total = max_steps if max_steps else epochs * per_epoch
    return Steps(rows, micro, per_epoch, math.ceil(total / per_epoch), total)


def collate(batch: dict, all_tokens: bool = False) -> dict:
    """Ray Data numpy batch (fixed-length list columns) -> int tensors. `all_tokens`
    (train.loss_on: all): every token of a document is a target, prompts included, except
    its first (never predicted from the previous document) and padding."""
    import numpy as np
    import torch

    from raylab.train.loss import IGNORE

    out = {k: torch.from_numpy(np.stack(v) if v.dtype == object else np.array(v)) for k, v in batch.items()}
    if all_tokens:
        keep = (out["segment_ids"] > 0) & (out["position_ids"] > 0)
        out["labels"] = torch.where(keep, out["input_ids"], torch.full_like(out["input_ids"], IGNORE))
    return out


def _make_collate(all_tokens: bool = False):
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate(batch, all_tokens)

    return Collate()


def _quiet_worker() -> None:
    """Keep the driver's console to raylab's progress line: Ray Train logs every report at
    INFO under loggers named by file path (its level filter misses them), transformers draws
    a weight-loading bar, and peft trips a transformers deprecation warning."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    for name in list(logging.root.manager.loggerDict):
        if "ray/train" in name or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def interval(acc: dict) -> dict:
    """A logging interval's token-mean loss and totals, from the loop's accumulators."""
    return {"loss": acc["loss_sum"] / max(acc["targets"], 1), **{k: acc[k] for k in ("grad_norm", "real_tokens", "seconds", "steps")}}


def use_bf16(precision: str, device) -> bool:
    import torch

    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def replica_digest(model) -> str:
    """sha256 of this worker's trainable weights: DDP replicas must agree bit for bit."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from raylab.models import load_for_training
    from raylab.train import checkpoint, loss, metrics

    _quiet_worker()
    cfg = RaylabConfig.model_validate(loop_config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:  # one worker's progress lines (and a gate's) reach the driver's console
        logs.console()
    torch.set_num_threads(loop_config["torch_threads"])
    device = ray.train.torch.get_device()
    bf16 = use_bf16(t.precision, device)
    steps = plan_steps(loop_config["train_rows"], world, t.batch_size, t.grad_accum, t.epochs, t.max_steps)

    checkpoint.seed_all(t.seed)  # identical initial adapters on every rank
    model = load_for_training(cfg.model, device)
    if t.gradient_checkpointing:  # non-reentrant; also makes input embeddings require grads
        model.activation_checkpointing_enable() if hasattr(model, "activation_checkpointing_enable") else \
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    flops = metrics.flops_per_token(model, cfg.data.max_seq_len)
    peak = metrics.measure_peak_flops(device, bf16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    warmup = int(t.warmup_ratio * steps.total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: loss.lr_factor(s, steps.total, warmup, t.schedule))

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0, "world_size": world,
                             "best_val_loss": None, "evals_without_improvement": 0, "stopped_early": False,
                             "last_checkpoint_step": -1, "history": [], "val": None, "flops": flops}
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state = checkpoint.restore(d, rank=rank, world_size=world, model=model, optimizer=optimizer,
                                       scheduler=scheduler, seed=t.seed)
        state.setdefault("resumed_at_steps", []).append(state["step"])
        if state["world_size"] != world:  # elastic restart: convert the data position via rows
            rows_done = state["batches_in_epoch"] * t.batch_size * state["world_size"]
            state["batches_in_epoch"], state["world_size"] = rows_done // (t.batch_size * world), world
        if rank == 0:
            log.info(f"train: resumed from step {state['step']} (epoch {state['epoch']}, "
                     f"{state['batches_in_epoch']} micro-batches into it)")
    else:
        checkpoint.seed_all(t.seed + 7919 * rank)  # dropout streams differ per rank
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU) when world > 1
    attn_impl = loss.attn_impl_of(checkpoint.unwrap(model))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    metrics_path = loop_config["metrics_path"]

    collate_fn = _make_collate(t.loss_on == "all")

    def on_device(batch: dict) -> dict:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    val_cache: list[dict] | None = [] if loop_config["val_bytes"] <= VAL_CACHE_BYTES else None
    train_cache: dict | None = {} if loop_config["train_bytes"] / world <= TRAIN_CACHE_BYTES else None

    def train_batches(epoch: int):
        """This worker's batches for `epoch`, the same after any restart. A small shard is read
        once into memory and each epoch is a seeded permutation of its rows: every pass over a
        Ray Data shard costs seconds of start-up, which a small corpus trained for many epochs
        (the quickstart's pre-training) would otherwise pay every epoch."""
        import torch

        if train_cache is None:
            return iter(train_shard.iter_torch_batches(
                batch_size=t.batch_size, collate_fn=collate_fn, local_shuffle_buffer_size=16 * t.batch_size,
                prefetch_batches=2, local_shuffle_seed=t.seed + epoch))
        if not train_cache:
            parts = list(train_shard.iter_torch_batches(batch_size=t.batch_size, collate_fn=collate_fn))
            train_cache.update({k: torch.cat([b[k] for b in parts]) for k in parts[0]} if parts else {})
        n = len(next(iter(train_cache.values()))) if train_cache else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed + epoch))
        return ({k: v[order[i:i + t.batch_size]] for k, v in train_cache.items()} for i in range(0, n, t.batch_size))

    def val_batches():
        """Stream the val shard; a small one is kept in memory after the first pass, since
        each pass over a Ray Data shard costs seconds of execution start-up."""
        if val_cache:
            yield from (on_device(b) for b in val_cache)
            return
        # Every worker streams the whole (unsplit) val set and evaluates every world-th
        # batch: Ray Train's split is `equal=True`, which drops rows to even the shards, so
        # the val loss would depend on the number of workers.
        batches = val_shard.iter_torch_batches(batch_size=t.eval_batch_size, collate_fn=collate_fn)
        for i, b in enumerate(batches):
            if i % world != rank:
                continue
            if val_cache is not None:
                val_cache.append(b)
            yield on_device(b)

    def run_eval() -> None:
        batches = val_batches()
        # The unwrapped module: DDP's forward may sync buffers, a collective that ranks with
        # different batch counts would not all reach.
        state["val"] = loss.evaluate(checkpoint.unwrap(model), batches, device=device, attn_impl=attn_impl, bf16=bf16)
        v = state["val"]["val_loss"]
        if state["best_val_loss"] is None or v < state["best_val_loss"]:
            state["best_val_loss"], state["evals_without_improvement"] = v, 0
        else:
            state["evals_without_improvement"] += 1

    def report(row: dict, with_checkpoint: bool, to_ray: bool = True) -> None:
        """Every row goes to the progress line and metrics.jsonl; only evaluations and
        checkpoints go to Ray Train (and so to Tune): a report is a round trip through Ray
        Train's controller, about a second here, which log-only steps need not pay."""
        state["history"].append(row)
        if rank == 0:
            log.info(metrics.progress_line(row, steps.total, time.perf_counter() - started, started_at))
            storage.write_text(metrics_path, metrics.to_jsonl(state["history"]))
        if not with_checkpoint:
            if to_ray:
                ray.train.report(row)
            return
        state["last_checkpoint_step"] = state["step"]
        if state["step"] >= steps.total or state["stopped_early"]:
            mine = (replica_digest(checkpoint.unwrap(model)), ray.get_runtime_context().get_node_id())
            gathered = [None] * world
            if dist.is_initialized():
                dist.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            state["replica_digests"] = [g[0] for g in gathered]
            state["worker_nodes"] = [g[1] for g in gathered]
        with tempfile.TemporaryDirectory(prefix="raylab-ckpt-") as d:
            checkpoint.save(d, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler, state=state)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))

    def row(window_stats: dict, evaluated: bool) -> dict:
        val = state["val"] or {}
        interval = window_stats["seconds"] or float("nan")
        tokens_per_s = window_stats["real_tokens"] / interval
        return {
            "step": state["step"], "epoch": state["epoch"], "loss": window_stats["loss"],
            "lr": scheduler.get_last_lr()[0], "grad_norm": window_stats["grad_norm"],
            "tokens_per_s": tokens_per_s, "step_time_s": interval / max(window_stats["steps"], 1),
            "mfu": flops["flops_per_token"] * tokens_per_s / world / peak,
            "tokens": state["tokens"], "evaluated": evaluated,
            "val_loss": val.get("val_loss"), "val_perplexity": val.get("val_perplexity"),
            "val_token_accuracy": val.get("val_token_accuracy"), "best_val_loss": state["best_val_loss"],
        }

    started, started_at = time.perf_counter(), state["step"]
    if state["val"] is None:  # the baseline: every report then carries a val_loss
        run_eval()
        report(row({"loss": None, "grad_norm": None, "real_tokens": 0, "seconds": 0.0, "steps": 0}, True), False)
    every_ckpt = t.checkpoint_every or t.eval_every
    # A sweep's scheduler may hold the workers after an evaluation (ASHA, raylab/tune/asha.py).
    gate = loop_config.get("gate")
    if gate is not None:
        gate.start(state["step"], steps.total)
    acc = {"loss_sum": 0.0, "targets": 0, "real_tokens": 0, "seconds": 0.0, "steps": 0, "grad_norm": 0.0}
    while not state["stopped_early"] and state["step"] < steps.total and state["epoch"] < steps.epochs:
        batches = train_batches(state["epoch"])
        for _ in range(state["batches_in_epoch"]):  # order-preserving skip to the data position
            next(batches, None)
        while state["step"] < steps.total:
            tic = time.perf_counter()
            window = [on_device(b) for b in itertools.islice(batches, t.grad_accum)]
            if not window:
                break
            out = loss.train_step(model, optimizer, window, device=device, world_size=world, attn_impl=attn_impl,
                                  max_grad_norm=t.max_grad_norm, bf16=bf16)
            scheduler.step()
            state["step"] += 1
            state["batches_in_epoch"] += len(window)
            state["tokens"] += out["real_tokens"]
            acc["loss_sum"] += out["loss"] * out["targets"]
            acc["targets"] += out["targets"]
            acc["real_tokens"] += out["real_tokens"]
            acc["grad_norm"] = out["grad_norm"]
            acc["steps"] += 1
            acc["seconds"] += time.perf_counter() - tic
            step, last = state["step"], state["step"] >= steps.total
            ckpt_due = step % every_ckpt == 0 or last
            evaluated = step % t.eval_every == 0 or ckpt_due
            if evaluated:
                run_eval()
                patience = t.early_stopping_patience
                state["stopped_early"] = bool(patience and state["evals_without_improvement"] >= patience)
            if step % t.log_every == 0 or evaluated:
                report(row(interval(acc), evaluated), ckpt_due or state["stopped_early"], to_ray=evaluated)
                acc = dict.fromkeys(acc, 0) | {"loss_sum": 0.0, "seconds": 0.0}
                if gate is not None and evaluated:
                    gate.after_eval(step)
            if state["stopped_early"]:
                if rank == 0:
                    log.info(f"train: early stop at step {step}: val_loss has not improved for "
                             f"{t.early_stopping_patience} evaluations (best {state['best_val_loss']:.4f})")
                break
        else:
            break
        if state["stopped_early"]:
            break
        state["epoch"] += 1
        state["batches_in_epoch"] = 0
    if state["last_checkpoint_step"] != state["step"]:  # e.g. an epoch ended short of the plan
        run_eval()
        state["stopped_early"] = True
        report(row(interval(acc), True), True)


