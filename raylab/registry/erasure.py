"""Versions that hold an erased record: found by the data they were trained on, tagged
`raylab.erasure_pending`, refused by `raylab models promote` unless forced with a reason.

    trained_on(store, ["3f9c0e1a2b4d5e6f"])        # versions whose data_manifest_hash is one of these
    mark_pending(store, mv, [4])                    # suppression entry 4 names a record it holds

Erasure stops future use only: a tagged version still holds the record in its weights; the
tag means "retrain without it" (docs/governance.md). The tag's value lists the suppression
entries (core/lineage.py) that made it; it stays on the version for good.
"""

from __future__ import annotations

from raylab.core import events, lineage
from raylab.registry.store import Store

TAG = "raylab.erasure_pending"
TAG_LIMIT = 4000  # MLflow caps a version tag's value at 5000 characters


def pending(mv) -> list[str]:
    """The suppression entries a version's tag names ([] when none is pending)."""
    value = mv.tags.get(TAG, "")
    return [p for p in value.split(",") if p]


def tag_value(entries: list[str]) -> str:
    """Entry ids, comma-separated; past the tag's size limit the oldest are kept and the
    rest summarised (`raylab lineage` lists them all from the control-plane database)."""
    text = ",".join(entries)
    if len(text) <= TAG_LIMIT:
        return text
    kept = text[:TAG_LIMIT].rsplit(",", 1)[0]
    return f"{kept},+{len(entries) - kept.count(',') - 1}-more"


def trained_on(store: Store, manifest_hashes: list[str]) -> list:
    """Every registered version (of any model) trained on one of these data-stage outputs."""
    found = {}
    for digest in sorted(set(manifest_hashes)):
        if not digest.isalnum():  # a hash is hex; never let a value into the filter's syntax
            continue
        for mv in store.client.search_model_versions(f"tags.data_manifest_hash = '{digest}'"):
            found[(mv.name, int(mv.version))] = mv
    return [found[k] for k in sorted(found)]


def mark_pending(store: Store, mv, entries: list[int | str], reason: str = "") -> bool:
    """Add suppression entries to a version's erasure_pending tag and record the change (one
    `registry.erasure_pending` event); False when the tag named them all already."""
    have = pending(mv)
    new = [str(e) for e in entries if str(e) not in have]
    if not new:
        return False
    store.client.set_model_version_tag(mv.name, str(mv.version), TAG, tag_value(have + new))
    events.emit("registry.erasure_pending", run=mv.tags.get("raylab.output_dir"), model=mv.name, version=mv.version,
                erasures=[int(e) if str(e).isdigit() else e for e in new], reason=reason)
    return True


def at_registration(manifest_hash: str | None) -> dict[str, str]:
    """The tag a new version starts with when its data holds a record erased before it was
    registered (trained on a data run made before the erasure): registration must not clear
    what the erasure found."""
    entries = lineage.pending_for(manifest_hash or "")
    return {TAG: tag_value([str(e) for e in entries])} if entries else {}
