"""Train stage: fine-tune `model.name_or_path` on the data stage's shards with Ray Train V2.

    raylab data configs/quickstart.yaml
    raylab train configs/quickstart.yaml                      # resumes if interrupted
    raylab train configs/quickstart.yaml train.num_workers=2 train.resume=false

Reads `<output_dir>/data/` (train/val Parquet + manifest.json) and writes `<output_dir>/train/`:
checkpoint_*/ (best `train.keep_checkpoints` by val loss, plus the latest), metrics.jsonl,
loss.png, and final/ — a Hugging Face model directory (peft adapter or full weights, the
tokenizer with its chat template, raylab_train.json with lineage and metrics).

The whole loop is `train_loop_per_worker` below; the objective (packed-row masks, token-
normalised gradient accumulation, evaluation) is in `raylab/loss.py`, checkpoint contents
and the data-position rule in `raylab/checkpoint.py`, FLOPs/MFU in `raylab/metrics.py`.

Resume: a worker failure restarts all workers from the latest checkpoint
(`train.max_failures`); running the same command again after the driver died continues
from the latest checkpoint of `<output_dir>/train` (Ray Train's own snapshot), unless
`train.resume=false`. A finished run with unchanged inputs is not trained again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylab import cluster, config, storage
from raylab.config import RaylabConfig
from raylab.errors import UserError

META = "raylab_train.json"
VAL_CACHE_BYTES = 256 << 20  # a val split up to this size stays in each worker's memory
TRAIN_CACHE_BYTES = 256 << 20  # so does a train shard up to this size (per worker)
DRIVER_READ_BYTES = 64 << 20  # a split up to this size is read by the driver itself (read_split)
MATERIALIZE_BYTES = 1 << 30  # a split up to this size is read into the object store once
# Keys that change how a run is executed, not what it computes: a resumed run may change them.
OPERATIONAL_KEYS = {"num_workers", "cpus_per_worker", "gpus_per_worker", "torch_threads", "placement_strategy",
                    "max_failures", "resume", "log_every", "keep_checkpoints", "checkpoint_every"}


# ---------------------------------------------------------------- the loop (runs on every worker)


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

    from raylab.loss import IGNORE

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

    from raylab import asha, checkpoint, loss, metrics
    from raylab.model import load_for_training

    _quiet_worker()
    cfg = RaylabConfig.model_validate(loop_config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
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
            print(f"train: resumed from step {state['step']} (epoch {state['epoch']}, "
                  f"{state['batches_in_epoch']} micro-batches into it)", flush=True)
    else:
        checkpoint.seed_all(t.seed + 7919 * rank)  # dropout streams differ per rank
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU) when world > 1
    attn_impl = loss.attn_impl_of(checkpoint.unwrap(model))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    train_dir = loop_config["train_dir"]

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
            print(metrics.progress_line(row, steps.total, time.perf_counter() - started, started_at), flush=True)
            storage.write_text(storage.join(train_dir, "metrics.jsonl"), metrics.to_jsonl(state["history"]))
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
    # In an ASHA sweep: wait at each rung for the scheduler's decision (raylab/asha.py).
    rungs = asha.RungWait(loop_config["rungs"], state["step"], steps.total) if loop_config.get("rungs") else None
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
                if rungs and evaluated:
                    rungs.after_report(step, log=print if rank == 0 else lambda _: None)
            if state["stopped_early"]:
                if rank == 0:
                    print(f"train: early stop at step {step}: val_loss has not improved for "
                          f"{t.early_stopping_patience} evaluations (best {state['best_val_loss']:.4f})", flush=True)
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


# ---------------------------------------------------------------- the driver


def read_manifest(cfg: RaylabConfig) -> dict:
    path = storage.join(cfg.output_dir, "data", "manifest.json")
    if not storage.exists(path):
        raise UserError(f"no data stage output at {path}; run `raylab data {cfg.source or 'CONFIG'}` first")
    return json.loads(storage.read_text(path))


def manifest_hash(manifest: dict) -> str:
    stable = {k: v for k, v in manifest.items() if k not in ("created", "cache")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def identity(cfg: RaylabConfig, manifest: dict) -> dict:
    """What the trained weights depend on; a resumed run must match it exactly."""
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in OPERATIONAL_KEYS}
    material = {"model": cfg.model.model_dump(mode="json"), "train": train, "data": manifest_hash(manifest)}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return {"hash": digest, **material}


def preflight(cfg: RaylabConfig, manifest: dict) -> None:
    """Every check that would otherwise fail inside a worker, at once, before Ray starts."""
    from raylab import model

    problems = []
    tok = model.load_tokenizer(cfg.model)
    ours, theirs = model.fingerprint(tok), manifest.get("tokenizer", {})
    if ours["fingerprint"] != theirs.get("fingerprint"):
        differ = [k for k in ("vocab_size", "vocab_hash", "special_tokens", "template_hash") if ours.get(k) != theirs.get(k)]
        problems.append(f"the data shards were tokenized with a different tokenizer than model.name_or_path="
                        f"{cfg.model.name_or_path} ({', '.join(differ)} differ: vocab_size {theirs.get('vocab_size')} vs "
                        f"{ours['vocab_size']}); rerun `raylab data` with this model")
    seq_len = manifest.get("tokens", {}).get("max_seq_len", cfg.data.max_seq_len)
    if seq_len != cfg.data.max_seq_len:
        problems.append(f"the data shards hold {seq_len}-token sequences but data.max_seq_len={cfg.data.max_seq_len}; "
                        "rerun `raylab data` after changing the data section")
    problems += model.training_problems(cfg.model, seq_len, cfg.train.gpus_per_worker)
    rows = manifest.get("tokens", {}).get("train", {}).get("sequences", 0)
    if rows < cfg.train.max_workers:
        problems.append(f"the train split has {rows} sequences, fewer than train.num_workers={cfg.train.max_workers}; "
                        "add data or lower train.num_workers")
    if manifest.get("tokens", {}).get("val", {}).get("sequences", 0) == 0:
        problems.append("the val split is empty, so there is no val_loss to evaluate or rank checkpoints by; "
                        "raise data.val_fraction")
    if problems:
        raise UserError("cannot train:\n  " + "\n  ".join(problems))


def _previous_run(train_dir: str) -> dict | None:
    path = storage.join(train_dir, "run.json")
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def _start_or_resume(cfg: RaylabConfig, train_dir: str, ident: dict, log) -> dict | None:
    """Returns the finished run's metadata when there is nothing to do."""
    prev = _previous_run(train_dir)
    if prev is not None and not cfg.train.resume:
        log(f"train: train.resume=false; discarding the previous run in {train_dir}")
        storage.reset_dir(train_dir)
        prev = None
    if prev is not None and prev["identity"]["hash"] != ident["hash"]:
        changed = [f"{section}.{k}" for section in ("model", "train") for k in ident[section]
                   if prev["identity"][section].get(k) != ident[section][k]]
        if prev["identity"]["data"] != ident["data"]:
            changed.append("the data stage's output")
        raise UserError(f"{train_dir} holds a run made with different settings ({', '.join(changed) or 'config'}); "
                        "to continue it restore them, or start over with train.resume=false, or use another output_dir")
    final_meta = storage.join(train_dir, "final", META)
    if prev is not None and storage.exists(final_meta):
        meta = json.loads(storage.read_text(final_meta))
        if meta.get("identity") == ident["hash"]:
            log(f"train: already finished with these settings: {storage.join(train_dir, 'final')} "
                "(train.resume=false trains again)")
            return meta
    storage.write_text(storage.join(train_dir, "run.json"), json.dumps({"identity": ident}, indent=2) + "\n")
    return None


def code_version() -> str:
    import raylab

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"raylab {raylab.__version__}" + (f" ({commit})" if commit else "")


def _unwrap_user_error(e: BaseException) -> str | None:
    text = str(e)
    marker = "UserError: "
    return text.split(marker, 1)[1].strip().splitlines()[0] if marker in text else None


def read_split(location: str, nbytes: int, num_cpus: float):
    """A Ray Dataset over one packed split (`nbytes`: its size in memory).

    A small split is read whole by the driver with pyarrow (files in sorted order) and
    handed to Ray as one block: a Ray Data read costs the driver ~4 s of execution start-up
    per split, which a short run (every tune trial) would pay twice. A larger one is read in
    parallel by Ray Data and, up to MATERIALIZE_BYTES, kept in the object store, since every
    epoch otherwise re-lists and re-reads the files."""
    import ray

    if nbytes <= DRIVER_READ_BYTES:
        import pyarrow.parquet as pq

        filesystem, path = storage.resolve(location)
        return ray.data.from_arrow(pq.read_table(path, filesystem=filesystem))
    ds = ray.data.read_parquet(location, num_cpus=num_cpus)
    return ds.materialize() if nbytes <= MATERIALIZE_BYTES else ds


def run_train(cfg: RaylabConfig, address: str | None = None, log=print, callbacks: list | None = None,
              track: bool = True, rungs: dict | None = None) -> dict:
    """Run the train stage; returns the final model's metadata (also in final/raylab_train.json).

    With `track` (and registry.enabled) the driver then logs the run to MLflow and registers
    the model; tune trials pass track=False: their sweep's driver logs them. `rungs`: an ASHA
    trial's workers wait at those steps for the scheduler's decision (raylab/asha.py)."""
    from raylab import pretrain

    cfg = pretrain.resolve(cfg)  # a `pretrain` section: its pre-trained model is the base
    manifest = read_manifest(cfg)
    preflight(cfg, manifest)
    conn, plan = cluster.prepare(cfg, address, state_api=True)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = data_context.print_on_execution_start = False
    data_context.execution_options.preserve_order = True  # the same block order in every run
    train_dir = storage.join(cfg.output_dir, "train")
    ident = identity(cfg, manifest)
    done = _start_or_resume(cfg, train_dir, ident, log)
    if done is not None:
        return _track(cfg, done, log) if track else done
    config.write_resolved(cfg)
    t = cfg.train
    execution = ray.data.ExecutionOptions(preserve_order=True)  # deterministic shards: resume can skip
    # int32 input_ids, labels, position_ids, segment_ids per sequence
    nbytes = {split: manifest["tokens"][split]["sequences"] * cfg.data.max_seq_len * 16 for split in ("train", "val")}
    datasets = {split: read_split(manifest["outputs"][split], nbytes[split], cfg.data.cpus_per_task) for split in nbytes}
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": t.gpus_per_worker} if t.gpus_per_worker else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "torch_threads": plan.torch_threads,
                           "train_rows": manifest["tokens"]["train"]["sequences"], "train_dir": train_dir,
                           "val_bytes": nbytes["val"], "train_bytes": nbytes["train"], "rungs": rungs},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                                               resources_per_worker=resources, placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            name="train", storage_path=cfg.output_dir,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="val_loss",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=list(callbacks or []),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=execution),
    )
    workers = t.num_workers if isinstance(t.num_workers, int) else f"{t.min_workers}-{t.max_workers}"
    log(f"train: {cfg.model.method} on {cfg.model.name_or_path}, {workers} worker(s) x {plan.torch_threads} thread(s), "
        f"{manifest['tokens']['train']['sequences']} sequences x {cfg.data.max_seq_len} -> {train_dir}")
    started = time.time()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        message = _unwrap_user_error(e)
        if message:
            raise UserError(message) from None
        raise RuntimeError(f"training failed: {e}\nThe latest checkpoint is kept: run the same command again to "
                           f"resume from it (or raise train.max_failures to restart failed workers automatically)") from None
    meta = finalize(cfg, result, manifest, ident, time.time() - started, log)
    return _track(cfg, meta, log) if track else meta


def _track(cfg: RaylabConfig, meta: dict, log) -> dict:
    if not cfg.registry.enabled:
        return meta
    from raylab import registry

    return meta | {"registry": registry.track_train(cfg, meta, log)}


def finalize(cfg: RaylabConfig, result, manifest: dict, ident: dict, seconds: float, log) -> dict:
    """final/ (Hugging Face format + tokenizer + metadata), metrics.jsonl, loss.png."""
    from raylab import checkpoint, metrics
    from raylab.model import load_tokenizer, resolve

    train_dir = storage.join(cfg.output_dir, "train")
    final = storage.join(train_dir, "final")
    best = min(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_loss", math.inf), default=None)
    with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="raylab-final-") as staging:
        state = checkpoint.read_state(d)
        shutil.copytree(os.path.join(d, "model"), staging, dirs_exist_ok=True)
        load_tokenizer(cfg.model).save_pretrained(staging)
        digests = state.get("replica_digests") or []
        if len(set(digests)) > 1:
            raise RuntimeError(f"DDP replicas ended with different weights {digests}: a bug, please report it")
        last = state["history"][-1]
        flops_token = state["flops"]["flops_per_token"]
        meta = {
            "stage": "train",
            "identity": ident["hash"],
            "base_model": cfg.model.name_or_path,
            "base_model_path": resolve(cfg.model.name_or_path),
            "method": cfg.model.method,
            "data_manifest_hash": ident["data"],
            "config_hash": ident["hash"],
            "code_version": code_version(),
            "steps": state["step"],
            "epochs_started": state["epoch"] + 1,
            "stopped_early": state["stopped_early"],
            "world_size": state["world_size"],
            "replica_digests": digests,
            "worker_nodes": state.get("worker_nodes", []),
            "resumed_at_steps": state.get("resumed_at_steps", []),
            "trained_tokens": state["tokens"],
            "flops_per_token": flops_token,
            "estimated_training_flops": flops_token * state["tokens"],
            "flops_formula": "4*N + 2*N_trainable + 12*layers*hidden*seq_len per real token (raylab/metrics.py)",
            "metrics": {k: last.get(k) for k in ("val_loss", "val_perplexity", "val_token_accuracy")}
                       | {"best_val_loss": state["best_val_loss"], "train_loss": last.get("loss"),
                          "initial_val_loss": state["history"][0].get("val_loss")},
            "best_checkpoint": best[0].path if best else None,
            "latest_checkpoint": result.checkpoint.path,
            "train_seconds": round(seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        Path(staging, META).write_text(json.dumps(meta, indent=2) + "\n")
        storage.copy_dir(staging, final)
    storage.write_text(storage.join(train_dir, "metrics.jsonl"), metrics.to_jsonl(state["history"]))
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "loss.png")
        metrics.plot_loss(state["history"], png, f"{cfg.run_name}: {cfg.model.method} on {cfg.model.name_or_path}")
        storage.write_bytes(storage.join(train_dir, "loss.png"), Path(png).read_bytes())
    m = meta["metrics"]
    log(f"train: {meta['steps']} steps, {meta['trained_tokens']:,} tokens in {seconds:.0f}s; val_loss "
        f"{m['initial_val_loss']:.4f} -> {m['val_loss']:.4f} (best {m['best_val_loss']:.4f}), perplexity "
        f"{m['val_perplexity']:.2f}, token accuracy {m['val_token_accuracy']:.1%}")
    log(f"train: model -> {final}")
    return meta
