"""The training loop: `train_loop_per_worker` runs on every Ray Train worker.

The objective is `train.objective` (objectives.py); packed-row masks, token-normalised
gradient accumulation and evaluation are in loss.py, checkpoint contents and the
data-position rule in checkpoint.py, FLOPs/MFU in metrics.py; the driver (driver.py) builds
the trainer and hands this function its `loop_config`. What a checkpoint must carry for a
resumed run to continue is `TrainState` (its state.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from raylab.config import RaylabConfig
from raylab.core import logs, storage
from raylab.train.loss import collate  # Ray Data batch -> tensors

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


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint as state.json (these field names are its keys,
    read back by resumed runs and by the driver's final/ metadata)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this epoch consumed (the data position)
    tokens: int = 0
    world_size: int = 1
    best_val_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    last_checkpoint_step: int = -1
    history: list[dict] = field(default_factory=list)  # every metrics row
    val: dict | None = None  # the latest evaluation
    flops: dict = field(default_factory=dict)
    resumed_at_steps: list[int] = field(default_factory=list)
    replica_digests: list[str] = field(default_factory=list)  # set by the last checkpoint
    worker_nodes: list[str] = field(default_factory=list)
    ingest: dict = field(default_factory=dict)  # how the splits reached the workers (Shards.ingest)
    dtype: str = ""  # the weights' dtype as loaded (model.dtype resolved on the worker's device)
    precision: str = ""  # what the matmuls compute in: bf16 autocast, or the weights' dtype
    strategy: str = "ddp"  # train.strategy: the layout of optimizer.pt depends on it

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        """From a checkpoint's state.json (older ones lack the fields that have defaults)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stepped(self, out: dict, micro_batches: int) -> None:
        self.step += 1
        self.batches_in_epoch += micro_batches
        self.tokens += out["real_tokens"]

    def evaluated(self, val: dict) -> None:
        """Record an evaluation: the best val loss, evaluations without improvement."""
        self.val = val
        v = val["val_loss"]
        if self.best_val_loss is None or v < self.best_val_loss:
            self.best_val_loss, self.evals_without_improvement = v, 0
        else:
            self.evals_without_improvement += 1

    def out_of_patience(self, patience: int | None) -> bool:
        return bool(patience and self.evals_without_improvement >= patience)


@dataclass
class Window:
    """The optimizer steps since the last metrics row."""

    loss_sum: float = 0.0  # token loss summed over the window's target tokens
    targets: int = 0
    real_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    grad_norm: float = 0.0  # the latest step's

    def add(self, out: dict, seconds: float) -> None:
        self.loss_sum += out["loss"] * out["targets"]
        self.targets += out["targets"]
        self.real_tokens += out["real_tokens"]
        self.grad_norm = out["grad_norm"]
        self.steps += 1
        self.seconds += seconds

    def stats(self) -> dict:
        """The window's token-mean loss and totals."""
        return {"loss": self.loss_sum / max(self.targets, 1), "grad_norm": self.grad_norm, "real_tokens": self.real_tokens,
                "seconds": self.seconds, "steps": self.steps}


BASELINE = {"loss": None, "grad_norm": None, "real_tokens": 0, "seconds": 0.0, "steps": 0}  # before any step


def metrics_row(state: TrainState, window: dict, evaluated: bool, *, lr: float, flops_per_token: float, world: int,
                peak_flops: float) -> dict:
    """One row of metrics.jsonl (and of a report to Ray Train)."""
    val = state.val or {}
    seconds = window["seconds"] or float("nan")
    tokens_per_s = window["real_tokens"] / seconds
    return {
        "step": state.step, "epoch": state.epoch, "loss": window["loss"],
        "lr": lr, "grad_norm": window["grad_norm"],
        "tokens_per_s": tokens_per_s, "step_time_s": seconds / max(window["steps"], 1),
        "mfu": flops_per_token * tokens_per_s / world / peak_flops,
        "tokens": state.tokens, "evaluated": evaluated,
        "val_loss": val.get("val_loss"), "val_perplexity": val.get("val_perplexity"),
        "val_token_accuracy": val.get("val_token_accuracy"), "best_val_loss": state.best_val_loss,
        "time": round(time.time(), 3),  # wall clock at the row: throughput over any span of steps
    }


def _make_collate(all_tokens: bool = False):
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate(batch, all_tokens)

    return Collate()


class Shards:
    """This worker's train shard and the val split, as batches."""

    def __init__(self, t, rank: int, world: int, device, val_bytes: int, train_bytes: int, *, val_cache_bytes: int,
                 train_cache_bytes: int):
        import ray.train

        self.t, self.rank, self.world, self.device = t, rank, world, device
        self.train = ray.train.get_dataset_shard("train")
        self.val = ray.train.get_dataset_shard("val")
        self.collate_fn = _make_collate(t.loss_on == "all")
        # the thresholds: driver.TRAIN_CACHE_BYTES and VAL_CACHE_BYTES (or their environment overrides)
        self.val_cache: list[dict] | None = [] if val_bytes <= val_cache_bytes else None
        self.train_cache: dict | None = {} if train_bytes / world <= train_cache_bytes else None

    def ingest(self, read: dict) -> dict:
        """How each split reaches this worker: the driver's read, then cached or streamed here."""
        return {f"{split}_read": how for split, how in read.items()} | {
            "train_in_worker": "cached" if self.train_cache is not None else "streamed",
            "val_in_worker": "cached" if self.val_cache is not None else "streamed"}

    def on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_batches(self, epoch: int):
        """This worker's batches for `epoch`, the same after any restart. A small shard is read
        once into memory and each epoch is a seeded permutation of its rows: every pass over a
        Ray Data shard costs seconds of start-up, which a small corpus trained for many epochs
        (the quickstart's pre-training) would otherwise pay every epoch."""
        import torch

        t, cache = self.t, self.train_cache
        if cache is None:
            return iter(self.train.iter_torch_batches(
                batch_size=t.batch_size, collate_fn=self.collate_fn, local_shuffle_buffer_size=16 * t.batch_size,
                prefetch_batches=2, local_shuffle_seed=t.seed + epoch))
        if not cache:
            parts = list(self.train.iter_torch_batches(batch_size=t.batch_size, collate_fn=self.collate_fn))
            cache.update({k: torch.cat([b[k] for b in parts]) for k in parts[0]} if parts else {})
        n = len(next(iter(cache.values()))) if cache else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed + epoch))
        return ({k: v[order[i:i + t.batch_size]] for k, v in cache.items()} for i in range(0, n, t.batch_size))

    def val_batches(self):
        """Stream the val shard; a small one is kept in memory after the first pass, since
        each pass over a Ray Data shard costs seconds of execution start-up."""
        if self.val_cache:
            yield from (self.on_device(b) for b in self.val_cache)
            return
        # Every worker streams the whole (unsplit) val set and evaluates every world-th
        # batch: Ray Train's split is `equal=True`, which drops rows to even the shards, so
        # the val loss would depend on the number of workers.
        batches = self.val.iter_torch_batches(batch_size=self.t.eval_batch_size, collate_fn=self.collate_fn)
        for i, b in enumerate(batches):
            if i % self.world != self.rank:
                continue
            if self.val_cache is not None:
                self.val_cache.append(b)
            yield self.on_device(b)


def _quiet_worker() -> None:
    """Keep the driver's console to raylab's progress line: Ray Train logs every report at
    INFO under loggers named by file path (its level filter misses them), transformers draws
    a weight-loading bar, and peft trips a transformers deprecation warning."""
    import warnings

    from transformers.utils import logging as hf_logging

    for name in list(logging.root.manager.loggerDict):
        if "ray/train" in name or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def use_bf16(precision: str, device) -> bool:
    import torch

    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def replica_digest(model) -> str:
    """sha256 of this worker's trainable weights: DDP replicas must agree bit for bit (FSDP
    workers each hold their own shard, so theirs differ by design)."""
    from raylab.train import sharding

    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(sharding.local_tensor(p.detach()).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def replicas(model, world: int) -> tuple[list[str], list[str]]:
    """Every worker's weight digest and node id, gathered (all ranks must call this)."""
    import ray
    import torch.distributed as dist

    mine = (replica_digest(model), ray.get_runtime_context().get_node_id())
    gathered: list[Any] = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    return [g[0] for g in gathered], [g[1] for g in gathered]


def resume_point(rank: int, run: str | None = None):
    """The checkpoint to resume from, or None: the one Ray Train hands back if its checksums
    hold, else the newest good one beside it (with a warning and a train.checkpoint_rejected
    event in `run`), else none (a fresh start)."""
    import ray.train

    resumed = ray.train.get_checkpoint()
    return _good_checkpoint(resumed, rank, run) if resumed else None


def start_state(t, directory: str | None, *, rank: int, world: int, flops: dict, model, optimizer, scheduler) -> TrainState:
    """A fresh state, or the checkpoint in `directory` (resume_point's, its weights already
    loaded by checkpoint.restore_weights) restored into the live objects."""
    from raylab.train import checkpoint

    if directory is None:
        checkpoint.seed_all(t.seed + 7919 * rank)  # dropout streams differ per rank
        return TrainState(world_size=world, flops=flops, strategy=t.strategy)
    state = TrainState.from_dict(checkpoint.restore(directory, rank=rank, world_size=world, model=model, optimizer=optimizer,
                                                    scheduler=scheduler, seed=t.seed))
    state.resumed_at_steps.append(state.step)
    if state.world_size != world:  # elastic restart: convert the data position via rows
        rows_done = state.batches_in_epoch * t.batch_size * state.world_size
        state.batches_in_epoch, state.world_size = rows_done // (t.batch_size * world), world
    if rank == 0:
        log.info(f"train: resumed from step {state.step} (epoch {state.epoch}, "
                 f"{state.batches_in_epoch} micro-batches into it)")
    return state


def _good_checkpoint(resumed, rank: int, run: str | None):
    """`resumed` if it verifies, else the good checkpoint beside it with the highest step, else
    None. Every rank decides alone, from the same files, so all ranks decide alike."""
    import pyarrow.fs as pafs
    import ray.train

    from raylab.core import events
    from raylab.train import checkpoint

    with resumed.as_directory() as d:
        bad = checkpoint.problems(d)
    if not bad:
        return resumed
    parent = resumed.path.rstrip("/").rsplit("/", 1)[0]
    infos = resumed.filesystem.get_file_info(pafs.FileSelector(parent))
    best, best_step = None, -1
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_") or info.path == resumed.path:
            continue
        candidate = ray.train.Checkpoint(info.path, filesystem=resumed.filesystem)
        with candidate.as_directory() as d:
            if checkpoint.problems(d):
                continue
            step = checkpoint.read_state(d)["step"]
        if step > best_step:
            best, best_step = candidate, step
    if rank == 0:
        to = f"the previous good checkpoint {best.path} (step {best_step})" if best else "step 0 (no good checkpoint is left)"
        log.warning(f"train: checkpoint {resumed.path} fails its checksums ({'; '.join(bad)}); resuming from {to}")
        events.emit("train.checkpoint_rejected", run=run, checkpoint=resumed.path, problems=bad,
                    resumed_from=best.path if best else None, resumed_step=best_step if best else 0)
    return best


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from raylab.models import enable_activation_checkpointing, load_for_training, resolved_dtype
    from raylab.train import checkpoint, loss, metrics, objectives, sharding

    _quiet_worker()
    cfg = RaylabConfig.model_validate(loop_config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:  # one worker's progress lines (and its gate's) reach the driver's console
        logs.console()
    torch.set_num_threads(loop_config["torch_threads"])
    device = ray.train.torch.get_device()
    bf16 = use_bf16(t.precision, device)
    steps = plan_steps(loop_config["train_rows"], world, t.batch_size, t.grad_accum, t.epochs, t.max_steps)

    checkpoint.seed_all(t.seed)  # identical initial adapters on every rank
    dtype, dtype_why = resolved_dtype(cfg.model, device)
    model = load_for_training(cfg.model, device, dtype)
    if t.activation_checkpointing:  # non-reentrant; also makes input embeddings require grads
        # Before sharding: a layer's recompute then runs inside its FSDP unit, whose parameters its backward gathers anyway.
        enable_activation_checkpointing(model)
    model.train()
    # The driver sends the objective's class (train.objective resolved); set up before DDP and the optimizer.
    objective = objectives.build(loop_config.get("objective") or t.objective, model, cfg,
                                 objectives.WorkerContext(rank=rank, world_size=world, device=device))
    flops = metrics.flops_per_token(model, cfg.data.max_seq_len)
    peak = metrics.measure_peak_flops(device, bf16)
    resumed = resume_point(rank, cfg.output_dir)
    with resumed.as_directory() if resumed else contextlib.nullcontext() as resumed_dir:
        if resumed_dir is not None:  # full tensors, so before sharding
            checkpoint.restore_weights(resumed_dir, model)
        # DDP, or FSDP2 (sharding.py); the optimizer is built after: fully_shard replaces the parameters.
        model = sharding.prepare(model, t.strategy, device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                      weight_decay=t.weight_decay)
        warmup = int(t.warmup_ratio * steps.total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: loss.lr_factor(s, steps.total, warmup, t.schedule))
        state = start_state(t, resumed_dir, rank=rank, world=world, flops=flops, model=model, optimizer=optimizer,
                            scheduler=scheduler)
    state.dtype, state.precision = dtype, "bf16 autocast" if bf16 else dtype
    if rank == 0:
        log.info(f"train: weights in {dtype} ({dtype_why}), compute in {state.precision}, {t.strategy} over {world} worker(s)")
    attn_impl = loss.attn_impl_of(checkpoint.unwrap(model))
    data = Shards(t, rank, world, device, loop_config["val_bytes"], loop_config["train_bytes"],
                  val_cache_bytes=loop_config["val_cache_bytes"], train_cache_bytes=loop_config["train_cache_bytes"])
    state.ingest = data.ingest(loop_config["read"])

    def evaluate() -> None:
        # The unwrapped module: DDP's forward may sync buffers, a collective that ranks with
        # different batch counts would not all reach.
        # A sharded model's forward is itself collective (all-gathers): ranks evaluate in lockstep.
        state.evaluated(loss.evaluate(checkpoint.unwrap(model), data.val_batches(), device=device, attn_impl=attn_impl,
                                      bf16=bf16, objective=objective, lockstep=sharding.is_sharded(model)))

    def row(window: dict, evaluated: bool) -> dict:
        return metrics_row(state, window, evaluated, lr=scheduler.get_last_lr()[0], flops_per_token=flops["flops_per_token"],
                           world=world, peak_flops=peak)

    def record(entry: dict) -> None:
        """Every row: the history, and on rank 0 the progress line and metrics.jsonl."""
        state.history.append(entry)
        if rank == 0:
            log.info(metrics.progress_line(entry, steps.total, time.perf_counter() - started, started_at))
            storage.write_text(loop_config["metrics_path"], metrics.to_jsonl(state.history))

    def save_checkpoint(entry: dict) -> None:
        """A checkpoint reported with the row `entry`; the last one carries every replica's weight digest."""
        state.last_checkpoint_step = state.step
        if state.step >= steps.total or state.stopped_early:
            state.replica_digests, state.worker_nodes = replicas(checkpoint.unwrap(model), world)
        with tempfile.TemporaryDirectory(prefix="raylab-ckpt-") as d:
            checkpoint.save(d, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler, state=state.to_dict())
            ray.train.report(entry, checkpoint=ray.train.Checkpoint.from_directory(d))

    def publish(entry: dict, *, with_checkpoint: bool, to_ray: bool = True) -> None:
        """Every row is recorded; only evaluations and checkpoints go to Ray Train (and so to
        Tune): a report is a round trip through Ray Train's controller, about a second here,
        which log-only steps need not pay."""
        record(entry)
        if with_checkpoint:
            save_checkpoint(entry)
        elif to_ray:
            ray.train.report(entry)

    started, started_at = time.perf_counter(), state.step
    if state.val is None:  # the baseline: every report then carries a val_loss
        evaluate()
        publish(row(BASELINE, True), with_checkpoint=False)
    every_ckpt = t.checkpoint_every or t.eval_every
    # A sweep's scheduler may hold the workers after an evaluation (ASHA, raylab/tune/asha.py).
    gate = loop_config.get("gate")
    if gate is not None:
        gate.start(state.step, steps.total)
    window = Window()
    while not state.stopped_early and state.step < steps.total and state.epoch < steps.epochs:
        batches = data.train_batches(state.epoch)
        for _ in range(state.batches_in_epoch):  # order-preserving skip to the data position
            next(batches, None)
        while state.step < steps.total:
            tic = time.perf_counter()
            micro_batches = [data.on_device(b) for b in itertools.islice(batches, t.grad_accum)]
            if not micro_batches:
                break  # the epoch is over
            out = loss.train_step(model, optimizer, micro_batches, device=device, world_size=world, attn_impl=attn_impl,
                                  max_grad_norm=t.max_grad_norm, bf16=bf16, objective=objective)
            scheduler.step()
            state.stepped(out, len(micro_batches))
            window.add(out, time.perf_counter() - tic)
            step = state.step
            ckpt_due = step % every_ckpt == 0 or step >= steps.total
            evaluated = step % t.eval_every == 0 or ckpt_due
            if evaluated:
                evaluate()
                state.stopped_early = state.out_of_patience(t.early_stopping_patience)
            if step % t.log_every == 0 or evaluated:
                publish(row(window.stats(), evaluated), with_checkpoint=ckpt_due or state.stopped_early, to_ray=evaluated)
                window = Window()
                if gate is not None and evaluated:
                    gate.after_eval(step)
            if state.stopped_early:
                if rank == 0:
                    log.info(f"train: early stop at step {step}: val_loss has not improved for "
                             f"{t.early_stopping_patience} evaluations (best {state.best_val_loss:.4f})")
                break
        else:
            break  # the planned steps are done (the epoch count stays where they ended)
        if state.stopped_early:
            break
        state.epoch += 1
        state.batches_in_epoch = 0
    if state.last_checkpoint_step != state.step:  # e.g. an epoch ended short of the plan
        evaluate()
        state.stopped_early = True
        publish(row(window.stats(), True), with_checkpoint=True)
