"""Aliases with a history MLflow does not keep: production and previous, who moved them,
when and why.

    promote(store, "acme-assistant", 3)               # only once its gates passed (or --force)
    rollback(store, "acme-assistant", reason="...")   # production -> previous, one step back
    promote(store, "acme-assistant", 3, principal=p)  # an authenticated caller (the API): needs
                                                      # models.promote in the version's org, and
                                                      # p must not be the version's creator

With `principal` (a core.access.Principal) the move is authorised first (core.access: role,
organisation, separation of duties; the decision is in the audit log either way) and the
audit event names that identity. Without one (the CLI, embedded single-user mode) nothing is
enforced and the OS user is recorded.

Each promote or rollback holds the model's alias lock (locks.py) from reading the aliases to
appending the last history entry, so concurrent moves (two operators, a pipeline's
auto-promote) apply one after the other and the history records every move, in order.
"""

from __future__ import annotations

import json
import time

from raylab.core import access, events
from raylab.errors import UserError
from raylab.registry import erasure
from raylab.registry.locks import alias_lock
from raylab.registry.store import PREVIOUS, PRODUCTION, Store
from raylab.registry.versions import get_version, registered_model, version_run

HISTORY_PREFIX = "raylab.alias_history."  # one registered-model tag per alias move


def user() -> str:
    return events.user()


def alias_history(store: Store, name: str) -> list[dict]:
    """Every alias move of a model, oldest first, each with its sequence number `seq`."""
    tags = registered_model(store, name).tags
    return [{"seq": int(k.removeprefix(HISTORY_PREFIX)), **json.loads(tags[k])}
            for k in sorted(k for k in tags if k.startswith(HISTORY_PREFIX))]


def _move(store: Store, name: str, alias: str, to: int | None, reason: str, forced: bool = False) -> dict:
    """Point `alias` at version `to` (None deletes it) and append the move to the history.
    Only under the model's alias_lock: nothing else makes the read-then-write atomic."""
    aliases = registered_model(store, name).aliases
    before = int(aliases[alias]) if alias in aliases else None
    if to is None:
        store.client.delete_registered_model_alias(name, alias)
    else:
        store.client.set_registered_model_alias(name, alias, str(to))
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "user": user(), "alias": alias,
             "from": before, "to": to, "reason": reason, "forced": forced}
    _append(store, name, entry)
    return entry


def _append(store: Store, name: str, entry: dict) -> int:
    """Write `entry` as the next history tag; returns its sequence number. The number is one
    past the highest so far (not the count, which a deleted tag would make reuse a number),
    read under the lock, so two moves never take the same number and overwrite each other."""
    seq = 1 + max((int(k.removeprefix(HISTORY_PREFIX)) for k in _history_tags(store, name)), default=-1)
    store.client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{seq:06d}", json.dumps(entry))
    return seq


def _history_tags(store: Store, name: str) -> list[str]:
    return sorted(k for k in registered_model(store, name).tags if k.startswith(HISTORY_PREFIX))


def _emit(kind: str, store: Store, name: str, moves: list[dict], principal=None, **fields) -> None:
    """One event per promote/rollback, in the run that produced the new production version."""
    production = next((m for m in moves if m["alias"] == PRODUCTION), None)
    if production is None or production["to"] is None:
        return
    run = version_run(get_version(store, f"{name}/{production['to']}"))
    identity = (principal.actor, principal.kind) if principal is not None else None
    events.emit(kind, run=run, model=name, version=production["to"], moves=moves, identity=identity, **fields)


def promote(store: Store, name: str, version: int, force: bool = False, reason: str | None = None,
            principal: access.Principal | None = None) -> list[dict]:
    """production -> version (the old production becomes `previous`), only for a version
    that passed its gates and holds no erased record (`raylab erase`) unless forced (then who
    and why are recorded, in the alias history and the audit log). With `principal`, only
    when core.access allows it (else access.Denied)."""
    mv = get_version(store, f"{name}/{version}")
    if principal is not None:
        access.require(principal, "models.promote", access.model_resource(name, version, mv.tags), run=version_run(mv))
    status = mv.tags.get("raylab.gates.status", "pending")
    erasures = erasure.pending(mv)
    if force and not reason:
        raise UserError("--force needs --reason: the alias history records who overrode the gates and why")
    if erasures and not force:
        raise UserError(f"{name}/{version} may not be promoted: it is erasure_pending (trained on data that holds "
                        f"record(s) erased since: suppression entries {', '.join(erasures)}; `raylab lineage "
                        "--erased` lists them); retrain without them (re-run the data stage, then train), or "
                        "override with --force --reason TEXT")
    if status != "passed" and not force:
        raise UserError(f"{name}/{version} may not be promoted: its gates are {status!r}"
                        + (f" ({mv.tags.get('raylab.gates.failures')})" if status == "failed" else "")
                        + f"; run `raylab models evaluate {name} {version}`, or override with --force --reason TEXT")
    overrode = (["gates"] if status != "passed" else []) + (["erasure_pending"] if erasures else [])
    with alias_lock(store, name):  # the aliases read here must still hold when they are moved
        aliases = registered_model(store, name).aliases
        current = int(aliases[PRODUCTION]) if PRODUCTION in aliases else None
        if current == version:
            return []
        why = reason or f"gates {status}"
        moves = [_move(store, name, PREVIOUS, current, f"was production before {version}")] if current is not None else []
        moves.append(_move(store, name, PRODUCTION, version, why, forced=bool(force and overrode)))
    # A forced promotion says what it overrode, with the reason (in `moves`), in the audit log.
    _emit("registry.promote", store, name, moves, principal,
          **({"overrode": overrode, "erasures": erasures} if overrode else {}))
    return moves


def rollback(store: Store, name: str, reason: str | None = None, principal: access.Principal | None = None) -> list[dict]:
    """production -> previous. The new `previous` is the version production had before that
    one (from the alias history), so repeated rollbacks walk back one step at a time. With
    `principal`, only when core.access allows models.rollback to that version."""
    with alias_lock(store, name):  # aliases and history read, both moved, as one step
        aliases = registered_model(store, name).aliases
        if PREVIOUS not in aliases:
            raise UserError(f"model {name!r} has no previous production version to roll back to "
                            f"(aliases: {dict(aliases) or 'none'})")
        target, current = int(aliases[PREVIOUS]), int(aliases[PRODUCTION]) if PRODUCTION in aliases else None
        if principal is not None:
            mv = get_version(store, f"{name}/{target}")
            access.require(principal, "models.rollback", access.model_resource(name, target, mv.tags), run=version_run(mv))
        earlier = next((h["from"] for h in reversed(alias_history(store, name))
                        if h["alias"] == PRODUCTION and h["to"] == target and h["from"] not in (None, target)), None)
        why = reason or "rollback"
        moves = [_move(store, name, PRODUCTION, target, f"rollback from {current}: {why}"),
                 _move(store, name, PREVIOUS, earlier, f"rollback to {target}")]
    _emit("registry.rollback", store, name, moves, principal)
    return moves


