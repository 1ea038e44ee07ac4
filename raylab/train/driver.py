"""Train stage: fine-tune `model.name_or_path` on the data stage's shards with Ray Train V2.

    raylab data configs/quickstart.yaml
    raylab train configs/quickstart.yaml                      # resumes if interrupted
    raylab train configs/quickstart.yaml train.num_workers=2 train.resume=false

Reads `<output_dir>/data/` (train/val Parquet + manifest.json) and writes `<output_dir>/train/`:
checkpoint_*/ (best `train.keep_checkpoints` by val loss, plus the latest), metrics.jsonl,
loss.png, and final/ — a Hugging Face model directory (peft adapter or full weights, the
tokenizer with its chat template, raylab_train.json with lineage and metrics).

This is the driver: it checks everything a worker would trip on, builds the `TorchTrainer`
and writes final/. The loop every worker runs is `train_loop_per_worker` in loop.py; the
objective in objectives.py (cross-entropy in loss.py), checkpoint contents and the
data-position rule in checkpoint.py, FLOPs/MFU in metrics.py.

Resume: a worker failure restarts all workers from the latest checkpoint
(`train.max_failures`); running the same command again after the driver died continues
from the latest checkpoint of `<output_dir>/train` (Ray Train's own snapshot), unless
`train.resume=false`. A finished run with unchanged inputs is not trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

from raylab import config, models
from raylab.config import RaylabConfig
from raylab.core import events, plan, runs, signals, storage
from raylab.errors import RunFailed, UserError
from raylab.train import checkpoint, metrics, objectives, pretrain
from raylab.train.loop import train_loop_per_worker
from raylab.version import __version__

# Where a split's rows live, by its size in memory; each is an environment variable of the
# same name with a RAYLAB_ prefix (bytes), read by the driver when a run starts, so a test
# (or a memory-tight cluster) can send a small corpus down the paths a large one takes.
DRIVER_READ_BYTES = 64 << 20  # a split up to this size is read by the driver itself (read_split)
MATERIALIZE_BYTES = 1 << 30  # a split up to this size is read into the object store once
TRAIN_CACHE_BYTES = 256 << 20  # a train shard up to this size per worker is kept in its memory
VAL_CACHE_BYTES = 256 << 20  # so is a val split up to this size; larger ones are streamed each pass
# Keys that change how a run is executed, not what it computes: a resumed run may change them.
OPERATIONAL_KEYS = {"num_workers", "cpus_per_worker", "gpus_per_worker", "torch_threads", "placement_strategy",
                    "max_failures", "resume", "log_every", "keep_checkpoints", "checkpoint_every"}

log = logging.getLogger(__name__)


def manifest_hash(manifest: runs.DataManifest) -> str:
    return runs.manifest_hash(manifest)  # one definition: the lineage index joins on it


def identity(cfg: RaylabConfig, manifest: runs.DataManifest) -> dict:
    """What the trained weights depend on; a resumed run must match it exactly."""
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in OPERATIONAL_KEYS}
    # As runs made before train.strategy and the activation_checkpointing name hashed it, so
    # they still resume (and a finished one is still found finished) with the same settings.
    train["gradient_checkpointing"] = train.pop("activation_checkpointing")
    if train["strategy"] == "ddp":
        del train["strategy"]
    # likewise train.provider (ray, here) and train.remote (unset for ray), added later still
    del train["provider"], train["remote"]
    material = {"model": cfg.model.model_dump(mode="json"), "train": train, "data": manifest_hash(manifest)}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return {"hash": digest, **material}


def preflight(cfg: RaylabConfig, manifest: runs.DataManifest) -> None:
    """Every check that would otherwise fail inside a worker, at once, before Ray starts."""
    problems = []
    tok = models.load_tokenizer(cfg.model)
    ours, theirs = models.fingerprint(tok), manifest.tokenizer
    if ours["fingerprint"] != theirs.get("fingerprint"):
        differ = [k for k in ("vocab_size", "vocab_hash", "special_tokens", "template_hash") if ours.get(k) != theirs.get(k)]
        problems.append(f"the data shards were tokenized with a different tokenizer than model.name_or_path="
                        f"{cfg.model.name_or_path} ({', '.join(differ)} differ: vocab_size {theirs.get('vocab_size')} vs "
                        f"{ours['vocab_size']}); rerun `raylab data` with this model")
    seq_len = manifest.tokens.max_seq_len
    if seq_len != cfg.data.max_seq_len:
        problems.append(f"the data shards hold {seq_len}-token sequences but data.max_seq_len={cfg.data.max_seq_len}; "
                        "rerun `raylab data` after changing the data section")
    problems += models.training_problems(cfg.model, seq_len, cfg.train.gpus_per_worker)
    if cfg.train.strategy == "fsdp" and cfg.model.method == "qlora":
        problems.append("train.strategy=fsdp with model.method=qlora: sharding bitsandbytes' 4-bit weights is not "
                        "supported by raylab; use train.strategy=ddp, or model.method=lora")
    rows = manifest.tokens.train.sequences
    if rows < cfg.train.max_workers:
        problems.append(f"the train split has {rows} sequences, fewer than train.num_workers={cfg.train.max_workers}; "
                        "add data or lower train.num_workers")
    try:
        objectives.resolve(cfg.train.objective)
    except UserError as e:
        problems.append(str(e))
    if manifest.tokens.val.sequences == 0:
        problems.append("the val split is empty, so there is no val_loss to evaluate or rank checkpoints by; "
                        "raise data.val_fraction")
    if problems:
        raise UserError("cannot train:\n  " + "\n  ".join(problems))


def _previous_run(run: runs.Run) -> dict | None:
    return json.loads(storage.read_text(run.train_identity)) if storage.exists(run.train_identity) else None


def _start_or_resume(resume: bool, run: runs.Run, ident: dict) -> dict | None:
    """Returns the finished run's metadata when there is nothing to do."""
    prev = _previous_run(run)
    if prev is not None and not resume:
        log.info(f"train: train.resume=false; discarding the previous run in {run.train}")
        storage.reset_dir(run.train)
        prev = None
    if prev is not None and prev["identity"]["hash"] != ident["hash"]:
        keys = {(section, k) for section in ("model", "train") for k in (*ident[section], *prev["identity"][section])}
        changed = sorted(f"{section}.{k}" for section, k in keys
                         if prev["identity"][section].get(k) != ident[section].get(k))
        changed = [c.replace("train.gradient_checkpointing", "train.activation_checkpointing") for c in changed]
        if prev["identity"]["data"] != ident["data"]:
            changed.append("the data stage's output")
        raise UserError(f"{run.train} holds a run made with different settings ({', '.join(changed) or 'config'}); "
                        "to continue it restore them, or start over with train.resume=false, or use another output_dir")
    if prev is not None and storage.exists(run.train_meta):
        meta = runs.read_json(run.train_meta, runs.TrainMeta)
        if meta.identity == ident["hash"]:
            log.info(f"train: already finished with these settings: {run.train_final} "
                     "(train.resume=false trains again)")
            return meta.model_dump(mode="json")
    storage.write_text(run.train_identity, json.dumps({"identity": ident}, indent=2) + "\n")
    return None


def code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"raylab {__version__}" + (f" ({commit})" if commit else "")


def _worker_died(e: BaseException) -> bool:
    """A Ray Train failure whose cause is a dead worker process (killed, OOM, node lost), not
    an exception raised by the training loop (that is a bug, with its traceback)."""
    text = str(e)
    return any(s in text for s in ("ActorDiedError", "The actor died", "worker process has died",
                                   "worker health check failed", "node died"))


def _unwrap_user_error(e: BaseException) -> str | None:
    text = str(e)
    marker = "UserError: "
    return text.split(marker, 1)[1].strip().splitlines()[0] if marker in text else None


def threshold(name: str) -> int:
    """One of the size thresholds above, or its RAYLAB_<NAME> environment override."""
    text = os.environ.get(f"RAYLAB_{name}")
    if text is None:
        return globals()[name]
    if not text.strip().isdigit():
        raise UserError(f"${{RAYLAB_{name}}}={text!r}: expected a size in bytes")
    return int(text)


def read_split(location: str, nbytes: int, num_cpus: float):
    """(a Ray Dataset over one packed split, how it is read: driver | materialized | streamed);
    `nbytes` is the split's size in memory.

    A small split is read whole by the driver with pyarrow (files in sorted order) and
    handed to Ray as one block: a Ray Data read costs the driver ~4 s of execution start-up
    per split, which a short run (every tune trial) would pay twice. A larger one is read in
    parallel by Ray Data and, up to MATERIALIZE_BYTES, kept in the object store, since every
    epoch otherwise re-lists and re-reads the files."""
    import ray

    sealed = storage.parquet_sealed(location)
    if nbytes <= threshold("DRIVER_READ_BYTES"):
        return ray.data.from_arrow(storage.read_table(location)), "driver"
    # Sealed shards (governance.encryption) are opened per file in the read tasks; plain ones
    # go through Ray's own Parquet reader (row-group splits, projection).
    ds = storage.read_parquet(location, num_cpus) if sealed else ray.data.read_parquet(location, num_cpus=num_cpus)
    return (ds.materialize(), "materialized") if nbytes <= threshold("MATERIALIZE_BYTES") else (ds, "streamed")


def run_train(cfg: RaylabConfig, address: str | None = None, callbacks: list | None = None,
              track: bool = True, gate=None, in_sweep: bool = False) -> dict:
    """Run the train stage; returns the final model's metadata (also in final/raylab_train.json).

    With `track` (and registry.enabled) the driver then logs the run to MLflow and registers
    the model; tune trials pass track=False: their sweep's driver logs them. `gate`: an
    object every worker consults after each evaluation, `start(step, last_step)` then
    `after_eval(step)` (a sweep's ASHA rungs: raylab/tune/asha.py `RungWait`). `in_sweep`: a
    tune trial, whose workers share the cores with the other concurrent trials' (the plan's
    `trial_threads`); a plain run's workers have the cores to themselves. Progress lines
    go to the `raylab.train` logger; stage.start then stage.end (or stage.failure) events to
    the run's events file."""
    if cfg.train.provider != "ray":  # a fine-tuning service trains; the data stage ran here
        from raylab.train import remote

        return remote.run_remote(cfg, track)
    with events.stage("train", run=cfg.output_dir):
        if not in_sweep:
            ensure_pretrained(cfg, address)
        return _train(cfg, address, callbacks, track, gate, in_sweep)


def ensure_pretrained(cfg: RaylabConfig, address: str | None = None) -> None:
    """`raylab train` / `raylab tune` on a config with a pretrain section whose base is not
    there yet: pre-train first (as `raylab run` would), rather than fail."""
    if pretrain.missing(cfg):
        log.info(f"pretrain: no pre-trained base at {pretrain.base_dir(cfg)} yet; pre-training it first (the pretrain section)")
        run_pretrain(cfg, address)


def _train(cfg: RaylabConfig, address: str | None, callbacks: list | None, track: bool, gate,
           in_sweep: bool = False) -> dict:
    cfg = pretrain.resolve(cfg)  # a `pretrain` section: its pre-trained model is the base
    run = runs.Run(cfg.output_dir)
    manifest = runs.read_manifest(run, cfg.source)
    preflight(cfg, manifest)
    _, the_plan = plan.prepare(cfg, address, state_api=True)
    threads = the_plan.trial_threads if in_sweep and the_plan.trial_threads else the_plan.torch_threads
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = data_context.print_on_execution_start = False
    data_context.execution_options.preserve_order = True  # the same block order in every run
    ident = identity(cfg, manifest)
    done = _start_or_resume(cfg.train.resume, run, ident)
    if done is not None:
        return _track(cfg, done) if track else done
    config.write_resolved(cfg)
    t = cfg.train
    execution = ray.data.ExecutionOptions(preserve_order=True)  # deterministic shards: resume can skip
    # int32 input_ids, labels, position_ids, segment_ids per sequence
    sequences = {"train": manifest.tokens.train.sequences, "val": manifest.tokens.val.sequences}
    nbytes = {split: n * cfg.data.max_seq_len * 16 for split, n in sequences.items()}
    reads = {split: read_split(manifest.outputs[split], nbytes[split], cfg.data.cpus_per_task) for split in nbytes}
    datasets = {split: ds for split, (ds, _) in reads.items()}
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": t.gpus_per_worker} if t.gpus_per_worker else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "torch_threads": threads,
                           "train_rows": sequences["train"], "metrics_path": run.train_metrics,
                           "val_bytes": nbytes["val"], "train_bytes": nbytes["train"], "gate": gate,
                           "val_cache_bytes": threshold("VAL_CACHE_BYTES"), "train_cache_bytes": threshold("TRAIN_CACHE_BYTES"),
                           "read": {split: how for split, (_, how) in reads.items()},
                           "objective": objectives.resolve(t.objective)},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                                               resources_per_worker=resources, placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            name=runs.TRAIN_RUN_NAME, storage_path=cfg.output_dir,
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
    log.info(f"train: {cfg.model.method} on {cfg.model.name_or_path}, {workers} {t.strategy} worker(s) x {threads} thread(s), "
             f"{sequences['train']} sequences x {cfg.data.max_seq_len} -> {run.train}")
    live = _open_live(cfg, ident["hash"]) if track else None
    started = time.time()
    try:
        with signals.callers_handlers():  # Ray Train leaves its SIGINT handler installed
            result = trainer.fit()
    except BaseException as e:
        if live is not None:  # the MLflow run shows how far it got
            live.poll(run.train_metrics)
            live.stop("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        _fit_failed(e, t.max_failures)
        raise
    try:
        meta = finalize(cfg, result, ident, time.time() - started)
    except BaseException:
        if live is not None:
            live.stop("FAILED")
        raise
    if live is not None:
        live.stop()
    return _track(cfg, meta, live) if track else meta


def _open_live(cfg: RaylabConfig, identity: str):
    """The run's MLflow run, opened as training starts, its metrics streaming (registry/live.py)."""
    if not cfg.registry.enabled:
        return None
    from raylab import registry

    live = registry.open_train_run(cfg, identity)
    if live is not None:
        live.follow(runs.Run(cfg.output_dir).train_metrics)
    return live


def _fit_failed(e: BaseException, max_failures: int) -> None:
    """Raise the error a failed `trainer.fit()` means for the user (returns for anything else)."""
    import ray.train

    if isinstance(e, ray.train.TrainingFailedError):
        message = _unwrap_user_error(e)
        if message:
            raise UserError(message) from None
        if _worker_died(e):
            raise RunFailed(f"training failed: a worker died and train.max_failures={max_failures} restart(s) were "
                            f"spent: {e}\nThe latest checkpoint is kept: run the same command again to resume from it "
                            "(or raise train.max_failures)") from None
        raise RuntimeError(f"training failed: {e}\nThe latest checkpoint is kept: run the same command again to "
                           f"resume from it (or raise train.max_failures to restart failed workers automatically)") from None


def _track(cfg: RaylabConfig, meta: dict, live=None) -> dict:
    if not cfg.registry.enabled:
        return meta
    from raylab import registry

    return meta | {"registry": registry.track_train(cfg, meta, live)}


def finalize(cfg: RaylabConfig, result, ident: dict, seconds: float) -> dict:
    """final/ (Hugging Face format + tokenizer + metadata), metrics.jsonl, loss.png."""
    run = runs.Run(cfg.output_dir)
    best = min(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_loss", math.inf), default=None)
    with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="raylab-final-") as staging:
        state = checkpoint.read_state(d)
        storage.copy_dir(os.path.join(d, checkpoint.MODEL_DIR), staging)
        storage.save_pretrained(models.load_tokenizer(cfg.model), staging)
        digests = state.get("replica_digests") or []
        if len(set(digests)) > 1 and state.get("strategy", "ddp") == "ddp":  # FSDP workers hold different shards
            raise RuntimeError(f"DDP replicas ended with different weights {digests}: a bug, please report it")
        last = state["history"][-1]
        flops_token = state["flops"]["flops_per_token"]
        meta = runs.TrainMeta(
            identity=ident["hash"], base_model=cfg.model.name_or_path, base_model_path=models.resolve(cfg.model.name_or_path),
            method=cfg.model.method, data_manifest_hash=ident["data"], config_hash=ident["hash"],
            code_version=code_version(), steps=state["step"], epochs_started=state["epoch"] + 1,
            stopped_early=state["stopped_early"], world_size=state["world_size"], replica_digests=digests,
            worker_nodes=state.get("worker_nodes", []), resumed_at_steps=state.get("resumed_at_steps", []),
            ingest=state.get("ingest", {}), trained_tokens=state["tokens"], flops_per_token=flops_token,
            estimated_training_flops=flops_token * state["tokens"],
            flops_formula="4*N + 2*N_trainable + 12*layers*hidden*seq_len per real token (raylab/train/metrics.py)",
            metrics={k: last.get(k) for k in ("val_loss", "val_perplexity", "val_token_accuracy")}
            | {"best_val_loss": state["best_val_loss"], "train_loss": last.get("loss"),
               "initial_val_loss": state["history"][0].get("val_loss")},
            best_checkpoint=best[0].path if best else None, latest_checkpoint=result.checkpoint.path,
            train_seconds=round(seconds, 1), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            dtype=state.get("dtype") or None, precision=state.get("precision") or None,
        )
        runs.write_json(runs.model_file(staging, runs.TRAIN_META), meta)
        storage.copy_dir(staging, run.train_final)
    storage.write_text(run.train_metrics, metrics.to_jsonl(state["history"]))
    metrics.plot_loss(state["history"], run.train_loss_png, f"{cfg.run_name}: {cfg.model.method} on {cfg.model.name_or_path}")
    m = meta.metrics
    log.info(f"train: {meta.steps} steps, {meta.trained_tokens:,} tokens in {seconds:.0f}s; val_loss "
             f"{m['initial_val_loss']:.4f} -> {m['val_loss']:.4f} (best {m['best_val_loss']:.4f}), perplexity "
             f"{m['val_perplexity']:.2f}, token accuracy {m['val_token_accuracy']:.1%}")
    log.info(f"train: model -> {run.train_final}")
    return meta.model_dump(mode="json")


def run_pretrain(cfg: RaylabConfig, address: str | None = None) -> dict:
    """Pre-train (or find the finished pre-training); returns its final metadata. Its
    stage.start then stage.end events (stage "pretrain") go to this run's events file."""
    if cfg.pretrain is None:
        raise UserError("the config has no pretrain section")
    with events.stage("pretrain", run=cfg.output_dir):
        return _pretrain(cfg, address)


def _pretrain(cfg: RaylabConfig, address: str | None) -> dict:
    # The pre-training reads the data stage's shards where they are: its manifest is a copy.
    src = runs.Run(cfg.output_dir)
    if not storage.exists(src.manifest):
        raise UserError(f"no data stage output at {src.manifest}: run `raylab data` (or `raylab run`) first")
    pretrain.build_base(cfg)  # with pretrain.tokenizer: the preset around the corpus tokenizer
    pcfg = pretrain.pretrain_config(cfg)
    storage.write_text(runs.Run(pcfg.output_dir).manifest, storage.read_text(src.manifest))
    return _train(pcfg, address, None, False, None)
