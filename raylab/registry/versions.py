"""Model versions: registration with lineage and checksums, references (NAME/VERSION,
NAME@ALIAS), verified fetches, gate results as tags, the listing.

    register(store, cfg, run_id, final_dir, meta)     # a new version from a train/final/ dir
    fetch(store, "acme-assistant@production")         # a verified local copy
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from raylab.config import RaylabConfig
from raylab.core import access, events, runs, storage
from raylab.core.secrets import redact_url
from raylab.errors import UserError
from raylab.registry import cards, erasure
from raylab.registry.store import PRODUCTION, Store, model_name

LINEAGE = ("base_model", "method", "data_manifest_hash", "config_hash", "code_version", "trained_tokens",
           "estimated_training_flops", "steps", "world_size", "dtype", "precision")
REF = re.compile(r"^(?P<name>[^@/]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


class IntegrityError(UserError):
    """A registered artifact no longer matches the checksums recorded at registration."""


def checksums(local_dir: str) -> dict[str, str]:
    """sha256 of every file under a directory, by relative path."""
    return {p.relative_to(local_dir).as_posix(): storage.sha256(str(p))
            for p in sorted(Path(local_dir).rglob("*")) if p.is_file()}


def register(store: Store, cfg: RaylabConfig, run_id: str, final: str, meta: dict, extra: dict | None = None,
             tuned: dict | None = None):
    """A new version of the config's model from a final/ directory (or the existing version
    of this run): the artifact under the run's `model/`, lineage and checksums as tags, and
    its model card under the run's `card/` (cards.py; `tuned`: a sweep winner's sampled values)."""
    from mlflow.exceptions import MlflowException

    name = model_name(cfg)
    existing = store.client.search_model_versions(f"run_id = '{run_id}'")
    for mv in existing:
        if mv.name == name:
            if cards.stored(store, run_id) is None:  # registered by a raylab without cards, or died before it
                cards.at_registration(store, cfg, mv, meta, tuned)
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
             "raylab.stage": "train"} | access.creator_tags() | (extra or {}) \
        | erasure.at_registration(meta.get("data_manifest_hash"))
    source = f"{store.client.get_run(run_id).info.artifact_uri}/model"
    mv = store.client.create_model_version(name, source, run_id, tags=tags,
                                           description=f"{meta.get('method')} on {meta.get('base_model')}")
    events.emit("registry.register", run=cfg.output_dir, model=name, version=mv.version, run_id=run_id,
                stage=tags["raylab.stage"], base_model=meta.get("base_model"), method=meta.get("method"))
    cards.at_registration(store, cfg, mv, meta, tuned)
    if erasure.TAG in tags:
        events.emit("registry.erasure_pending", run=cfg.output_dir, model=name, version=mv.version,
                    erasures=[int(e) for e in erasure.pending(mv) if e.isdigit()], reason="registered from data that holds an erased record")
    return mv


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
    raise UserError(f"no registered model {name!r} in {redact_url(store.uri)}; known: {', '.join(known) or 'none yet'}") from None


def version_run(mv) -> str | None:
    """The run directory a ModelVersion was registered from (its `raylab.output_dir` tag):
    where its registry, gate and deploy events go."""
    return mv.tags.get("raylab.output_dir")


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


REMOTE_TAG = "raylab.provider"  # set on a version a remote provider trained (train/remote.py)


def remote_tags(meta: dict) -> dict[str, str]:
    """The tags of a remote version: which provider holds its weights, and under what name."""
    return {REMOTE_TAG: meta["provider"], "raylab.remote.base_url": meta["base_url"],
            "raylab.remote.model": meta["fine_tuned_model"], "raylab.remote.job": meta["job"]}


def remote_of(mv) -> dict[str, str] | None:
    """{provider, base_url, model, job} of a remote version; None for one whose weights are here."""
    if REMOTE_TAG not in mv.tags:
        return None
    return {"provider": mv.tags[REMOTE_TAG], "base_url": mv.tags.get("raylab.remote.base_url"),
            "model": mv.tags.get("raylab.remote.model"), "job": mv.tags.get("raylab.remote.job")}


def fetch(store: Store, ref: str) -> str:
    """A verified local copy of a version's artifact under $RAYLAB_HOME/cache/registry/
    NAME/VERSION. Every fetch downloads the registry's copy and checks it file by file
    against the checksums recorded at registration: anything changed, missing or added is
    refused. The download lands beside the cache and is renamed into place, and a cached
    copy that verifies is never rewritten, so serve replicas on one node can fetch and load
    the same version at once."""
    import shutil

    from mlflow.artifacts import download_artifacts

    mv = get_version(store, ref)
    expected, label = json.loads(mv.tags.get("raylab.checksums", "null")), f"{mv.name}/{mv.version}"
    if (remote := remote_of(mv)) is not None:
        raise UserError(f"{label} was trained at {remote['base_url']} ({remote['provider']}): its weights stay there, "
                        f"served as {remote['model']!r} by that provider; raylab cannot load or serve it")
    dst = runs.home().registry_cache(mv.name, mv.version)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mv.version}-", dir=dst.parent))
    try:
        local = download_artifacts(artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=store.uri)
        verify(local, expected, label)
        if not _verifies(dst, expected, label):
            # A damaged cache: set it aside rather than rewrite it under a reader. Another
            # fetch may have set it aside first: then there is nothing to move.
            with contextlib.suppress(FileNotFoundError):
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
