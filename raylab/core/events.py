"""Every state change is one event, written by one writer: what the audit log builds on.

    events.emit("registry.promote", run=cfg.output_dir, model="acme", version=3, reason="gates passed")
    with events.stage("train", run=cfg.output_dir):      # stage.start, then stage.end or stage.failure
        ...
    events.read(Run(output_dir).events)                    # the run's events, oldest first

An event is `{time, kind, actor, actor_kind, run, model, version, fields}` (DESIGN.md; `actor_kind`
is `os-user` for the user@host in `actor`, room for an API identity later). It is appended as
one JSON line to the run's `events.jsonl` (when the change belongs to a run) and to
`$RAYLAB_HOME/events/<date>.jsonl` (always). Kinds: stage.start, stage.end, stage.failure,
registry.register, registry.gate, registry.promote, registry.rollback, serve.start,
serve.stop, serve.deploy, train.checkpoint_rejected (a resumed run found its checkpoint
damaged and fell back to an older one), data.erase (`raylab erase` put a record on the
suppression list), registry.erasure_pending (a version was found to hold an erased record),
access.allow and access.deny (an access decision, raylab/core/access/; its `actor` is the
authenticated identity, `actor_kind` how it authenticated), access.key_create and
access.key_revoke (`raylab keys create|revoke`), keys.rotate (`raylab keys rotate`: the new key, how many files), serve.canary_start,
serve.canary_promote and serve.canary_rollback (`raylab deploy REF --canary`: the rollout and
its controller's decision, with both versions' metrics).

One writer per cluster: while this process is connected to Ray, events go to a named actor
(`WRITER`, no CPU, one call at a time), so drivers, trial drivers, Train workers and Serve
replicas never interleave half lines in a file; without Ray (`raylab models promote`) the
process appends itself, under a file lock. The same writer appends each event to the
tamper-evident audit log (raylab/core/audit/: a hash chain in the control-plane database, with
signed checkpoints) before its JSON lines, unless governance.audit.enabled is false
($RAYLAB_AUDIT=0). An event the audit log cannot take (its database unreachable) raises: no
state change is recorded without its audit entry.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from raylab.core import runs, storage

WRITER = "raylab-events"
NAMESPACE = "raylab"
KINDS = ("stage.start", "stage.end", "stage.failure", "registry.register", "registry.gate", "registry.promote",
         "registry.rollback", "serve.start", "serve.stop", "serve.deploy", "train.checkpoint_rejected",
         "data.erase", "registry.erasure_pending", "access.allow", "access.deny", "access.key_create",
         "access.key_revoke", "keys.rotate", "serve.canary_start", "serve.canary_promote", "serve.canary_rollback",
         "train.remote_upload", "train.remote_job", "serve.load", "serve.unload")


def actor() -> str:
    """Who made the change: $RAYLAB_USER, else the login name, with the host."""
    try:
        user = os.environ.get("RAYLAB_USER") or getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def user() -> str:
    """The user part of `actor()` (recorded in the alias history)."""
    return actor().rsplit("@", 1)[0]


def event(kind: str, *, run: str | None = None, model: str | None = None, version: int | str | None = None,
          identity: tuple[str, str] | None = None, **fields: Any) -> dict:
    """An event record (not yet written). `identity`: (actor, actor_kind) of an authenticated
    caller (core.access), instead of this process's user@host as an `os-user`."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {KINDS}")
    now = datetime.datetime.now(datetime.timezone.utc)
    who, kind_of = identity or (actor(), "os-user")
    return {"time": now.isoformat(timespec="milliseconds"), "kind": kind, "actor": who, "actor_kind": kind_of,
            "run": run, "model": model, "version": None if version is None else str(version), "fields": fields}


def emit(kind: str, *, run: str | None = None, model: str | None = None, version: int | str | None = None,
         identity: tuple[str, str] | None = None, **fields: Any) -> dict:
    """Record one state change (see the module docstring); returns the event."""
    record = event(kind, run=run, model=model, version=version, identity=identity, **fields)
    targets = _targets(record)
    chain = _audit_settings()
    writer = _writer()
    if writer is None:
        _append(record, targets, chain)
    else:
        import ray

        ray.get(writer.write.remote(record, targets, chain), timeout=60)
    return record


def _audit_settings():
    """This process's audit settings (None when the audit log is off). The signing key is
    created here on first use, so its message reaches this process's console, not the
    writer actor's log."""
    from raylab.core import audit

    settings = audit.Settings.from_env()
    if not settings.enabled:
        return None
    if not settings.kms_key:
        audit.ensure_key(settings.key)
    return settings


@contextlib.contextmanager
def stage(name: str, run: str, **fields: Any) -> Iterator[None]:
    """stage.start, then stage.end when the block finishes or stage.failure (with the error's
    type and first line) when it raises; the exception goes on."""
    emit("stage.start", run=run, stage=name, **fields)
    try:
        yield
    except BaseException as e:
        message = (str(e).strip().splitlines() or [""])[0][:500]
        emit("stage.failure", run=run, stage=name, error=type(e).__name__, message=message, **fields)
        raise
    emit("stage.end", run=run, stage=name, **fields)


def read(location: str) -> list[dict]:
    """The events in a JSON-lines file, oldest first ([] when there is none yet)."""
    if not storage.exists(location):
        return []
    return [json.loads(line) for line in storage.read_text(location).splitlines() if line.strip()]


def _targets(record: dict) -> list[str]:
    day = record["time"][:10]
    out = [str(runs.home().events / f"{day}.jsonl")]
    if record["run"]:
        out.append(runs.Run(record["run"]).events)
    return out


def _append(record: dict, targets: list[str], chain=None) -> None:
    if chain is not None:
        from raylab.core import audit

        audit.append(record, chain)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    for location in targets:
        with _locked(location):
            storage.append_text(location, line)


@contextlib.contextmanager
def _locked(location: str) -> Iterator[None]:
    """An exclusive lock beside a local file, so processes writing without Ray (or several
    writers on one machine) append whole lines; object stores have no lock to take."""
    if not storage.is_local(location):
        yield
        return
    import fcntl

    path = storage.local_path(location) + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class Writer:
    """The cluster's event writer (a named Ray actor, one call at a time)."""

    def write(self, record: dict, targets: list[str], chain=None) -> None:
        _append(record, targets, chain)


_handles: dict[str, object] = {}  # cluster (GCS address) -> the writer's handle


def _writer():
    """The writer actor when this process is connected to Ray, else None."""
    import sys

    if "ray" not in sys.modules:  # never import Ray just to learn it is not running
        return None
    import ray

    if not ray.is_initialized():
        return None
    cluster = ray.get_runtime_context().gcs_address
    if cluster not in _handles:
        remote = ray.remote(num_cpus=0, max_concurrency=1)(Writer)
        # get_if_exists: whoever emits first creates it; every other process finds it by name.
        # Detached, so a cluster keeps one writer across jobs and drivers.
        _handles[cluster] = remote.options(name=WRITER, namespace=NAMESPACE, get_if_exists=True,
                                           lifetime="detached").remote()
    return _handles[cluster]
