"""MLflow runs: a train run, a sweep (parent) and its trials (nested), each with params,
per-step metrics and artifacts; registering the winner goes through versions.py.

    track_train(cfg, meta)          # the train driver, after its run
    track_sweep(cfg, summary)       # the sweep driver, after its trials

Logging is idempotent: a run carries a `raylab.key` tag (its directory and identity), so
re-running a finished stage finds its MLflow run and version instead of adding new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.core.secrets import redact_url
from raylab.registry import cards
from raylab.registry.live import LIVE_STEP, LiveRun, metric_rows
from raylab.registry.store import Store, model_name, open_store
from raylab.registry.versions import register

log = logging.getLogger(__name__)


def experiment_id(store: Store, name: str) -> str:
    found = store.client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = f"{store.artifact_root}/{name}" if store.artifact_root else None
    return store.client.create_experiment(name, artifact_location=location)


def _key_tag(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]  # quote-free, whatever the paths hold


def key_tags(key: str) -> dict[str, str]:
    return {"raylab.key": _key_tag(key), "raylab.key_text": key[:5000]}


def find_run(store: Store, exp_id: str, key: str):
    runs = store.client.search_runs([exp_id], filter_string=f"tags.`raylab.key` = '{_key_tag(key)}'", max_results=1)
    return runs[0] if runs else None


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> text values (MLflow params), lists by index."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        return {k: v for i, value in enumerate(node) for k, v in flatten(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): (json.dumps(node) if isinstance(node, (list, dict)) else str(node))[:500]}


def log_run(store: Store, exp_id: str, *, name: str, key: str, params: dict[str, str], history: list[dict],
            artifacts: dict[str, str], tags: dict[str, str], parent: str | None = None, status: str = "FINISHED",
            live: LiveRun | None = None) -> str:
    """One MLflow run (or the existing one with this key): params, metrics per step, artifacts.
    `live`: the run opened when training started (live.py), which already has the params and
    the metrics streamed so far; the rest of `history` is added to it."""
    from mlflow.entities import Param

    existing = find_run(store, exp_id, key)
    if existing is not None and existing.data.tags.get("raylab.logged") == "true":
        return existing.info.run_id
    if live is not None:
        run_id = live.run_id
        live.log(history)
    else:
        if existing is not None:  # a driver died while logging it: log it again, whole
            store.client.delete_run(existing.info.run_id)
        all_tags = key_tags(key) | tags | ({"mlflow.parentRunId": parent} if parent else {})
        run_id = store.client.create_run(exp_id, run_name=name, tags=all_tags).info.run_id
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            store.client.log_batch(run_id, params=items[i:i + 100])
        metrics = metric_rows(history)
        for i in range(0, len(metrics), 1000):
            store.client.log_batch(run_id, metrics=metrics[i:i + 1000])
    with tempfile.TemporaryDirectory(prefix="raylab-mlflow-") as tmp:
        for name_, location in artifacts.items():
            if location and storage.exists(location):
                storage.write_bytes(str(Path(tmp, name_)), storage.read_bytes(location))
                store.client.log_artifact(run_id, str(Path(tmp, name_)))
    store.client.set_tag(run_id, "raylab.logged", "true")
    store.client.set_terminated(run_id, status=status)
    return run_id


def _history(location: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(location).splitlines() if x.strip()] if storage.exists(location) else []


def _train_run(cfg: RaylabConfig, identity: str) -> dict:
    """The key, name, params and tags of a train run's MLflow run (live or logged at the end)."""
    return {"key": f"train:{cfg.output_dir}:{identity}", "name": cfg.run_name, "params": flatten(cfg.model_dump(mode="json")),
            "tags": {"raylab.stage": "train", "raylab.output_dir": cfg.output_dir}}


def open_train_run(cfg: RaylabConfig, identity: str) -> LiveRun | None:
    """The train driver, as training starts: the run's MLflow run, created now (or the one a
    dead driver left, continued) so metrics stream to it (live.py); None when that run is
    already logged whole."""
    from mlflow.entities import Param

    store = open_store(cfg)
    exp = experiment_id(store, model_name(cfg))
    spec = _train_run(cfg, identity)
    r = cfg.registry
    existing = find_run(store, exp, spec["key"])
    if existing is not None and existing.data.tags.get("raylab.logged") == "true":
        return None
    if existing is not None:
        run_id = existing.info.run_id
        store.client.update_run(run_id, status="RUNNING")
        step = int(existing.data.tags.get(LIVE_STEP, "-1"))
        log.info(f"registry: continuing MLflow run {run_id} (metrics after step {step})")
        return LiveRun(store, run_id, step, r.live_interval_s, r.system_metrics, resumed=True)
    tags = key_tags(spec["key"]) | spec["tags"] | {"raylab.live": "true"}
    run_id = store.client.create_run(exp, run_name=spec["name"], tags=tags).info.run_id
    items = [Param(k, v) for k, v in sorted(spec["params"].items())]
    for i in range(0, len(items), 100):
        store.client.log_batch(run_id, params=items[i:i + 100])
    every = f"every {r.live_interval_s:g}s while training" if r.live_interval_s > 0 else "when training ends"
    log.info(f"registry: MLflow run {run_id} opened; metrics arrive {every}")
    return LiveRun(store, run_id, -1, r.live_interval_s, r.system_metrics)


def track_train(cfg: RaylabConfig, meta: dict, live: LiveRun | None = None, extra: dict[str, str] | None = None) -> dict:
    """Log a finished train run and register its model as a new version (the train driver);
    `live`: its run opened at the start (open_train_run), finished here; `extra`: more
    version tags (a remote version's: versions.remote_tags)."""
    store = live.store if live is not None else open_store(cfg)
    exp = experiment_id(store, model_name(cfg))
    run = runs.Run(cfg.output_dir)
    spec = _train_run(cfg, meta["identity"])
    run_id = log_run(store, exp, **spec, history=_history(run.train_metrics), artifacts=_run_artifacts(run), live=live)
    version = register(store, cfg, run_id, run.train_final, meta, extra=extra)
    log.info(f"registry: run {run_id} in experiment {model_name(cfg)!r}; model {version.name}/{version.version} ({redact_url(store.uri)}); "
             f"its model card: raylab models card {version.name}/{version.version}")
    return {"run_id": run_id, "name": version.name, "version": int(version.version)}


def _run_artifacts(run: runs.Run) -> dict[str, str]:
    """MLflow artifact name (the file's own name) -> location."""
    return _by_name([run.resolved_config, run.manifest, run.train_metrics, run.train_loss_png])


def _by_name(locations: list[str]) -> dict[str, str]:
    return {location.rsplit("/", 1)[-1]: location for location in locations}


def track_sweep(cfg: RaylabConfig, summary: dict) -> dict:
    """Log a sweep (parent run) and each trial (nested runs) from Tune's results, then
    register the winner (the sweep driver, after the trials have finished)."""
    store = open_store(cfg)
    exp = experiment_id(store, model_name(cfg))
    run = runs.Run(cfg.output_dir)
    t = cfg.tune
    parent = log_run(
        store, exp, name=f"{cfg.run_name} sweep", key=f"sweep:{cfg.output_dir}:{hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]}",
        params=flatten(cfg.model_dump(mode="json")), history=[],
        artifacts=_by_name([run.tune_file(f) for f in runs.TUNE_FILES if f != "study"] + [run.resolved_config]),
        tags={"raylab.stage": "sweep", "raylab.output_dir": cfg.output_dir})
    trial_runs = {}
    for row in summary["results"]:
        trial = run.trial(row["trial_id"])
        status = {"finished": "FINISHED", "stopped early": "KILLED"}.get(row["status"], "FAILED")
        trial_runs[row["trial_id"]] = log_run(
            store, exp, name=f"trial {row['trial_id']}", key=f"trial:{trial.root}",
            params={k: str(row[k]) for k in t.search_space if k in row},
            history=_history(trial.train_metrics), artifacts=_run_artifacts(trial),
            tags={"raylab.stage": "trial", "raylab.trial_status": row["status"], "raylab.output_dir": trial.root,
                  **({"raylab.error": row["error"][:5000]} if row.get("error") else {})},
            parent=parent, status=status)
    out = {"run_id": parent, "trials": len(trial_runs)}
    best = summary.get("best")
    if best and best.get("final_model"):
        meta = runs.read_json(runs.model_file(best["final_model"], runs.TRAIN_META), runs.TrainMeta).model_dump(mode="json")
        version = register(store, cfg, trial_runs[best["trial_id"]], best["final_model"], meta,
                           extra={"raylab.stage": "tune", "raylab.trial_id": best["trial_id"], "raylab.sweep_run_id": parent},
                           tuned=best.get("params"))
        out |= {"name": version.name, "version": int(version.version)}
        log.info(f"registry: sweep {parent} with {len(trial_runs)} trials; winner {version.name}/{version.version} ({redact_url(store.uri)})")
    return out




def register_derived(store: Store, parent, local_dir: str, *, derivation: str, tags: dict[str, str],
                     params: dict[str, str], output_dir: str, card_sections: dict[str, str]):
    """A new version of `parent`'s model (a ModelVersion) from a directory made out of it
    (`raylab optimize`): its own MLflow run in the model's experiment, the parent's lineage
    tags carried over (base model, data manifest, erasures: the data it came from is the
    parent's), `raylab.derived_from` NAME/VERSION and `raylab.derivation` (e.g.
    quantize:int8_weight_only), checksums, and `tags`; its model card is the parent's plus
    `card_sections` ({title: markdown}: what the method did), written once. Idempotent: the same derivation
    (`derivation` and `params`) of the same parent finds the version registered before (keyed
    on those, not on the files: safetensors headers from one model need not be byte-equal)."""
    from raylab.core import access, events
    from raylab.registry import erasure
    from raylab.registry.versions import LINEAGE, checksums

    name, parent_ref = parent.name, f"{parent.name}/{parent.version}"
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    lineage_tags = {"raylab.derived_from": parent_ref, "raylab.derivation": derivation}
    run_id = log_run(store, experiment_id(store, name), name=f"{parent_ref} {derivation}",
                     key=f"derived:{parent_ref}:{derivation}:{digest}", params=params, history=[], artifacts={},
                     tags={"raylab.stage": "optimize", "raylab.output_dir": output_dir} | lineage_tags)
    for mv in store.client.search_model_versions(f"run_id = '{run_id}'"):
        if mv.name == name:
            return mv
    sums = checksums(local_dir)
    store.client.log_artifacts(run_id, local_dir, "model")
    carried = {k: parent.tags[k] for k in LINEAGE if k in parent.tags}
    if erasure.TAG in parent.tags:
        carried[erasure.TAG] = parent.tags[erasure.TAG]
    all_tags = carried | erasure.at_registration(parent.tags.get("data_manifest_hash")) | {
        "raylab.checksums": json.dumps(sums, sort_keys=True), "raylab.gates": parent.tags.get("raylab.gates", "{}"),
        "raylab.gates.status": "pending", "raylab.output_dir": output_dir, "raylab.stage": "optimize",
        "raylab.run_name": parent.tags.get("raylab.run_name", name)} | access.creator_tags() | lineage_tags | tags
    source = f"{store.client.get_run(run_id).info.artifact_uri}/model"
    mv = store.client.create_model_version(name, source, run_id, tags=all_tags,
                                           description=f"{derivation} of {parent_ref}")
    events.emit("registry.register", run=output_dir, model=name, version=mv.version, run_id=run_id, stage="optimize",
                derived_from=parent_ref, derivation=derivation)
    cards.at_derivation(store, parent, mv, derivation, card_sections)
    log.info(f"registry: {name}/{mv.version} = {derivation} of {parent_ref} ({redact_url(store.uri)})")
    return mv
