"""The registry, on MLflow tracking + Model Registry: every run with its lineage, model
versions with checksums and gates, and aliases with a history MLflow does not keep.

    raylab models list [NAME]                         # versions, metrics, gate status, aliases
    raylab models show acme-assistant/3               # or acme-assistant@production
    raylab models evaluate acme-assistant 3           # run the gates stored with version 3
    raylab models promote acme-assistant 3            # production -> 3 (the old one: previous)
    raylab models rollback acme-assistant --reason "latency regression"
    mlflow ui --backend-store-uri sqlite:///$HOME/.raylab/mlflow/mlflow.db    # the same store

Where (DESIGN.md): `registry.tracking_uri`, else $MLFLOW_TRACKING_URI, else SQLite with
artifacts under $RAYLAB_HOME/mlflow. Only driver processes call this module (the train
driver after its run; the sweep driver for its trials, from Tune's results), never Train
workers or concurrent trials, so the SQLite default is never written concurrently.

Logging is idempotent: a run carries a `raylab.key` tag (its directory and identity), so
re-running a finished stage finds its MLflow run and version instead of adding new ones.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylab import storage
from raylab.config import RaylabConfig
from raylab.errors import UserError

PRODUCTION, PREVIOUS = "production", "previous"
HISTORY_PREFIX = "raylab.alias_history."  # one registered-model tag per alias move
LINEAGE = ("base_model", "method", "data_manifest_hash", "config_hash", "code_version", "trained_tokens",
           "estimated_training_flops", "steps", "world_size")
REF = re.compile(r"^(?P<name>[^@/]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


class IntegrityError(UserError):
    """A registered artifact no longer matches the checksums recorded at registration."""


@dataclass
class Store:
    client: Any  # mlflow.MlflowClient
    uri: str
    artifact_root: str | None  # for new experiments; None lets an MLflow server decide


def locate(tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(tracking URI, artifact root): the config's, else $MLFLOW_TRACKING_URI, else SQLite
    under $RAYLAB_HOME/mlflow. A SQLite store keeps its artifacts beside the database."""
    from raylab.model import raylab_home

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{raylab_home() / 'mlflow' / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        return uri, str(Path(uri.removeprefix("sqlite:///")).parent / "artifacts")
    return uri, None


def _check_reachable(uri: str, key: str) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"{key} {uri}: MLflow server not reachable ({reason}); start it or fix the URI") from None
    elif uri.startswith("sqlite:///"):
        try:
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{key} {uri}: cannot create the registry directory ({e.strerror})") from None
    elif "://" in uri and not uri.startswith(("file://", "databricks", "postgresql", "mysql", "mssql")):
        raise UserError(f"{key} {uri}: not a tracking URI MLflow understands (http(s)://, sqlite:///, a database URL)")


def open_store(cfg: RaylabConfig | None = None, tracking_uri: str | None = None) -> Store:
    """An MLflow client on the registry; exit 2 if it cannot be reached."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny file is noise
    # A dead server otherwise costs minutes of retries before the error.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    configured = tracking_uri or (cfg.registry.tracking_uri if cfg else None)
    key = "registry.tracking_uri" if configured else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "registry")
    uri, root = locate(configured)
    if cfg is not None and cfg.registry.artifact_location:
        root = cfg.registry.artifact_location.rstrip("/")
    _check_reachable(uri, key)
    import logging

    from mlflow import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema creation chatter on first use
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return Store(MlflowClient(tracking_uri=uri, registry_uri=uri), uri, root)


def model_name(cfg: RaylabConfig) -> str:
    name = cfg.registry.model_name or cfg.run_name
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
        raise UserError(f"registry.model_name: the run name {name!r} is not a usable model name; set "
                        "registry.model_name (letters, digits, '.', '_', '-')")
    return name


# ---------------------------------------------------------------- runs


def experiment_id(store: Store, name: str) -> str:
    found = store.client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = f"{store.artifact_root}/{name}" if store.artifact_root else None
    return store.client.create_experiment(name, artifact_location=location)


def _key_tag(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]  # quote-free, whatever the paths hold


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


def metric_rows(history: list[dict]) -> list:
    """MLflow metrics from metrics.jsonl rows: every finite number at its step; validation
    metrics only at the steps that evaluated (other rows repeat the last evaluation)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for row in history:
        step = int(row.get("step", 0))
        stamp = int(row["time"] * 1000) if isinstance(row.get("time"), (int, float)) else now
        for k, v in row.items():
            if k in ("step", "time") or (k.startswith(("val_", "best_val")) and row.get("evaluated") is False):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(Metric(k, float(v), stamp, step))
    return out


def log_run(store: Store, exp_id: str, *, name: str, key: str, params: dict[str, str], history: list[dict],
            artifacts: dict[str, str], tags: dict[str, str], parent: str | None = None, status: str = "FINISHED") -> str:
    """One MLflow run (or the existing one with this key): params, metrics per step, artifacts."""
    from mlflow.entities import Param

    existing = find_run(store, exp_id, key)
    if existing is not None and existing.data.tags.get("raylab.logged") == "true":
        return existing.info.run_id
    if existing is not None:  # a driver died while logging it: log it again, whole
        store.client.delete_run(existing.info.run_id)
    all_tags = {"raylab.key": _key_tag(key), "raylab.key_text": key[:5000], **tags} | ({"mlflow.parentRunId": parent} if parent else {})
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
                Path(tmp, name_).write_bytes(storage.read_bytes(location))
                store.client.log_artifact(run_id, str(Path(tmp, name_)))
    store.client.set_tag(run_id, "raylab.logged", "true")
    store.client.set_terminated(run_id, status=status)
    return run_id


def _history(location: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(location).splitlines() if x.strip()] if storage.exists(location) else []


def track_train(cfg: RaylabConfig, meta: dict, log=print) -> dict:
    """Log a finished train run and register its model as a new version (the train driver)."""
    store = open_store(cfg)
    exp = experiment_id(store, model_name(cfg))
    train_dir = storage.join(cfg.output_dir, "train")
    run_id = log_run(
        store, exp, name=cfg.run_name, key=f"train:{cfg.output_dir}:{meta['identity']}",
        params=flatten(cfg.model_dump(mode="json")), history=_history(storage.join(train_dir, "metrics.jsonl")),
        artifacts=_run_artifacts(cfg.output_dir, train_dir), tags={"raylab.stage": "train", "raylab.output_dir": cfg.output_dir})
    version = register(store, cfg, run_id, storage.join(train_dir, "final"), meta)
    log(f"registry: run {run_id} in experiment {model_name(cfg)!r}; model {version.name}/{version.version} ({store.uri})")
    return {"run_id": run_id, "name": version.name, "version": int(version.version)}


def _run_artifacts(output_dir: str, train_dir: str) -> dict[str, str]:
    return {"config.resolved.yaml": storage.join(output_dir, "config.resolved.yaml"),
            "manifest.json": storage.join(output_dir, "data", "manifest.json"),
            "metrics.jsonl": storage.join(train_dir, "metrics.jsonl"), "loss.png": storage.join(train_dir, "loss.png")}


def track_sweep(cfg: RaylabConfig, summary: dict, log=print) -> dict:
    """Log a sweep (parent run) and each trial (nested runs) from Tune's results, then
    register the winner (the sweep driver, after the trials have finished)."""
    store = open_store(cfg)
    exp = experiment_id(store, model_name(cfg))
    tune_dir = storage.join(cfg.output_dir, "tune")
    t = cfg.tune
    files = ["results.csv", "results.json", "best.yaml", "importance.json", "importance.png", "partial_dependence.json",
             "partial_dependence.png", "slice.png"]
    parent = log_run(
        store, exp, name=f"{cfg.run_name} sweep", key=f"sweep:{cfg.output_dir}:{hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]}",
        params=flatten(cfg.model_dump(mode="json")), history=[],
        artifacts={f: storage.join(tune_dir, f) for f in files} | {"config.resolved.yaml": storage.join(cfg.output_dir, "config.resolved.yaml")},
        tags={"raylab.stage": "sweep", "raylab.output_dir": cfg.output_dir})
    trial_runs = {}
    for row in summary["results"]:
        trial_dir = storage.join(tune_dir, "trials", row["trial_id"])
        status = {"finished": "FINISHED", "stopped early": "KILLED"}.get(row["status"], "FAILED")
        trial_runs[row["trial_id"]] = log_run(
            store, exp, name=f"trial {row['trial_id']}", key=f"trial:{trial_dir}",
            params={k: str(row[k]) for k in t.search_space if k in row},
            history=_history(storage.join(trial_dir, "train", "metrics.jsonl")),
            artifacts=_run_artifacts(trial_dir, storage.join(trial_dir, "train")),
            tags={"raylab.stage": "trial", "raylab.trial_status": row["status"], "raylab.output_dir": trial_dir,
                  **({"raylab.error": row["error"][:5000]} if row.get("error") else {})},
            parent=parent, status=status)
    out = {"run_id": parent, "trials": len(trial_runs)}
    best = summary.get("best")
    if best and best.get("final_model"):
        meta = json.loads(storage.read_text(storage.join(best["final_model"], "raylab_train.json")))
        version = register(store, cfg, trial_runs[best["trial_id"]], best["final_model"], meta,
                           extra={"raylab.stage": "tune", "raylab.trial_id": best["trial_id"], "raylab.sweep_run_id": parent})
        out |= {"name": version.name, "version": int(version.version)}
        log(f"registry: sweep {parent} with {len(trial_runs)} trials; winner {version.name}/{version.version} ({store.uri})")
    return out


# ---------------------------------------------------------------- versions


def checksums(local_dir: str) -> dict[str, str]:
    """sha256 of every file under a directory, by relative path."""
    return {p.relative_to(local_dir).as_posix(): storage.sha256(str(p))
            for p in sorted(Path(local_dir).rglob("*")) if p.is_file()}


def register(store: Store, cfg: RaylabConfig, run_id: str, final: str, meta: dict, extra: dict | None = None):
    """A new version of the config's model from a final/ directory (or the existing version
    of this run): the artifact under the run's `model/`, lineage and checksums as tags."""
    from mlflow.exceptions import MlflowException

    name = model_name(cfg)
    existing = store.client.search_model_versions(f"run_id = '{run_id}'")
    for mv in existing:
        if mv.name == name:
            return mv
    with tempfile.TemporaryDirectory(prefix="raylab-register-") as tmp:
        local = storage.copy_to_local(final, os.path.join(tmp, "model"))
        sums = checksums(local)
        store.client.log_artifacts(run_id, local, "model")
    try:
        store.client.create_registered_model(name, description=f"raylab model; runs in experiment {name!r}")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    metrics = meta.get("metrics", {})
    tags = {k: str(meta[k]) for k in LINEAGE if meta.get(k) is not None}
    tags |= {f"metric.{k}": f"{v:.6g}" for k, v in metrics.items() if isinstance(v, (int, float))}
    tags |= {"raylab.checksums": json.dumps(sums, sort_keys=True), "raylab.gates": cfg.registry.gates.model_dump_json(),
             "raylab.gates.status": "pending", "raylab.output_dir": cfg.output_dir, "raylab.run_name": cfg.run_name,
             "raylab.stage": "train"} | (extra or {})
    source = f"{store.client.get_run(run_id).info.artifact_uri}/model"
    return store.client.create_model_version(name, source, run_id, tags=tags,
                                             description=f"{meta.get('method')} on {meta.get('base_model')}")


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """`NAME/VERSION` or `NAME@ALIAS` -> (name, version, alias)."""
    m = REF.match(ref.strip())
    if not m:
        raise UserError(f"model reference {ref!r}: expected NAME/VERSION (acme-assistant/3) or NAME@ALIAS (acme-assistant@production)")
    return m["name"], int(m["version"]) if m["version"] else None, m["alias"]


def registered_model(store: Store, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return store.client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    known = sorted(m.name for m in store.client.search_registered_models())
    raise UserError(f"no registered model {name!r} in {store.uri}; known: {', '.join(known) or 'none yet'}") from None


def get_version(store: Store, ref: str):
    """The ModelVersion a REF names; exit 2 for an unknown name, version or alias."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_ref(ref)
    model = registered_model(store, name)
    try:
        if alias:
            return store.client.get_model_version_by_alias(name, alias)
        return store.client.get_model_version(name, str(version))
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    if alias:
        have = ", ".join(f"{a}->{v}" for a, v in sorted(model.aliases.items())) or "none"
        hint = f"; promote one with `raylab models promote {name} VERSION`" if alias == PRODUCTION else ""
        raise UserError(f"model {name!r} has no alias {alias!r} (aliases: {have}){hint}") from None
    versions = sorted(int(v.version) for v in store.client.search_model_versions(f"name = '{name}'"))
    raise UserError(f"model {name!r} has no version {version} (versions: {versions or 'none'})") from None


def version_number(store: Store, name: str, text: str) -> int:
    """A VERSION argument: a number, or `latest` (the highest version of the model)."""
    if text == "latest":
        registered_model(store, name)
        found = [int(v.version) for v in store.client.search_model_versions(f"name = '{name}'")]
        if not found:
            raise UserError(f"model {name!r} has no versions yet")
        return max(found)
    if not text.isdigit():
        raise UserError(f"VERSION {text!r}: expected a version number or latest")
    return int(text)


def fetch(store: Store, ref: str) -> str:
    """A verified local copy of a version's artifact under $RAYLAB_HOME/cache/registry/
    NAME/VERSION. Every fetch downloads the registry's copy and checks it file by file
    against the checksums recorded at registration: anything changed, missing or added is
    refused. The download lands beside the cache and is renamed into place, and a cached
    copy that verifies is never rewritten, so serve replicas on one node can fetch and load
    the same version at once."""
    import shutil

    from mlflow.artifacts import download_artifacts

    from raylab.model import raylab_home

    mv = get_version(store, ref)
    expected, label = json.loads(mv.tags.get("raylab.checksums", "null")), f"{mv.name}/{mv.version}"
    dst = raylab_home() / "cache" / "registry" / mv.name / str(mv.version)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mv.version}-", dir=dst.parent))
    try:
        local = download_artifacts(artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=store.uri)
        verify(local, expected, label)
        if not _verifies(dst, expected, label):
            if dst.exists():  # a damaged cache: set it aside rather than rewrite it under a reader
                os.rename(dst, tempfile.mkdtemp(prefix=f".{mv.version}-old-", dir=dst.parent))
            try:
                os.rename(local, dst)
            except OSError:  # another process put its verified copy there first
                verify(str(dst), expected, label)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for old in dst.parent.glob(f".{mv.version}-old-*"):
            shutil.rmtree(old, ignore_errors=True)
    return str(dst)


def _verifies(path: Path, expected: dict | None, label: str) -> bool:
    try:
        verify(str(path), expected, label)
        return path.exists()
    except IntegrityError:
        return False


def verify(local: str, expected: dict[str, str] | None, label: str) -> None:
    if expected is None:
        raise IntegrityError(f"{label}: no checksums recorded at registration; refusing to load it unverified")
    actual = checksums(local)
    changed = sorted(f for f in expected if actual.get(f) != expected[f])
    added = sorted(set(actual) - set(expected))
    if changed or added:
        parts = [f"{f} ({'missing' if f not in actual else 'sha256 ' + actual[f][:12] + ' != recorded ' + expected[f][:12]})"
                 for f in changed] + [f"{f} (not registered)" for f in added]
        raise IntegrityError(f"{label}: artifact does not match its registration checksums: {'; '.join(parts)}. "
                             "Refusing to load it; register the model again from its run")


# ---------------------------------------------------------------- aliases


def user() -> str:
    try:
        return os.environ.get("RAYLAB_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def alias_history(store: Store, name: str) -> list[dict]:
    tags = registered_model(store, name).tags
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(HISTORY_PREFIX))]


def _move(store: Store, name: str, alias: str, to: int | None, reason: str, forced: bool = False) -> dict:
    """Point `alias` at version `to` (None deletes it) and append the move to the history."""
    aliases = registered_model(store, name).aliases
    before = int(aliases[alias]) if alias in aliases else None
    if to is None:
        store.client.delete_registered_model_alias(name, alias)
    else:
        store.client.set_registered_model_alias(name, alias, str(to))
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "user": user(), "alias": alias,
             "from": before, "to": to, "reason": reason, "forced": forced}
    seq = len(alias_history(store, name))
    store.client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{seq:06d}", json.dumps(entry))
    return entry


def promote(store: Store, name: str, version: int, force: bool = False, reason: str | None = None) -> list[dict]:
    """production -> version (the old production becomes `previous`), only for a version
    that passed its gates unless forced (then who and why are recorded)."""
    mv = get_version(store, f"{name}/{version}")
    status = mv.tags.get("raylab.gates.status", "pending")
    if force and not reason:
        raise UserError("--force needs --reason: the alias history records who overrode the gates and why")
    if status != "passed" and not force:
        raise UserError(f"{name}/{version} may not be promoted: its gates are {status!r}"
                        + (f" ({mv.tags.get('raylab.gates.failures')})" if status == "failed" else "")
                        + f"; run `raylab models evaluate {name} {version}`, or override with --force --reason TEXT")
    aliases = registered_model(store, name).aliases
    current = int(aliases[PRODUCTION]) if PRODUCTION in aliases else None
    if current == version:
        return []
    why = reason or f"gates {status}"
    moves = [_move(store, name, PREVIOUS, current, f"was production before {version}")] if current is not None else []
    return moves + [_move(store, name, PRODUCTION, version, why, forced=force and status != "passed")]


def rollback(store: Store, name: str, reason: str | None = None) -> list[dict]:
    """production -> previous. The new `previous` is the version production had before that
    one (from the alias history), so repeated rollbacks walk back one step at a time."""
    aliases = registered_model(store, name).aliases
    if PREVIOUS not in aliases:
        raise UserError(f"model {name!r} has no previous production version to roll back to "
                        f"(aliases: {dict(aliases) or 'none'})")
    target, current = int(aliases[PREVIOUS]), int(aliases[PRODUCTION]) if PRODUCTION in aliases else None
    earlier = next((h["from"] for h in reversed(alias_history(store, name))
                    if h["alias"] == PRODUCTION and h["to"] == target and h["from"] not in (None, target)), None)
    why = reason or "rollback"
    moves = [_move(store, name, PRODUCTION, target, f"rollback from {current}: {why}")]
    return moves + [_move(store, name, PREVIOUS, earlier, f"rollback to {target}")]


def set_tags(store: Store, name: str, version: int, tags: dict[str, Any]) -> None:
    for k, v in tags.items():
        store.client.set_model_version_tag(name, str(version), k, str(v))


def versions(store: Store, name: str | None = None) -> list[dict]:
    """Rows for `raylab models list`: every version with its metrics, gates and aliases."""
    names = [name] if name else sorted(m.name for m in store.client.search_registered_models())
    rows = []
    for n in names:
        aliases = registered_model(store, n).aliases
        by_version: dict[int, list[str]] = {}
        for a, v in aliases.items():
            by_version.setdefault(int(v), []).append(a)
        for mv in sorted(store.client.search_model_versions(f"name = '{n}'"), key=lambda m: int(m.version)):
            rows.append({"name": n, "version": int(mv.version), "aliases": sorted(by_version.get(int(mv.version), [])),
                         "method": mv.tags.get("method"), "val_loss": mv.tags.get("metric.val_loss"),
                         "gates": mv.tags.get("raylab.gates.status", "pending"), "stage": mv.tags.get("raylab.stage"),
                         "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(mv.creation_timestamp / 1000)),
                         "run_id": mv.run_id})
    return rows
