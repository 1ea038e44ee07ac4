"""The registry, on MLflow tracking + Model Registry: every run with its lineage, model
versions with checksums and gates, and aliases with a history MLflow does not keep.

    raylab models list [NAME]                         # versions, metrics, gate status, aliases
    raylab models show acme-assistant/3               # or acme-assistant@production
    raylab models promote acme-assistant 3            # production -> 3 (the old one: previous)
    raylab models rollback acme-assistant --reason "latency regression"

Modules: store (where the registry is, opening it), tracking (runs, sweeps, trials),
versions (register, refs, verified fetch; a derived version's lineage: tracking.register_derived), cards (every
version's model card), aliases (promote, rollback, history), locks (one
lock per model around alias moves), erasure (versions holding an erased record: the
`raylab.erasure_pending` tag the promote gate refuses). Runs and versions are written only by driver processes
(the train driver, the sweep driver), never Train workers or concurrent trials. Alias moves
can come from several places at once (operators, pipelines), so they hold the model's lock;
fetches by several serve replicas land in one cache by atomic rename.
"""

from __future__ import annotations

from raylab.registry.aliases import alias_history, promote, rollback, user
from raylab.registry.cards import add_section as add_card_section
from raylab.registry.cards import card_for
from raylab.registry.cards import download_files as download_card_files
from raylab.registry.cards import refresh as refresh_card
from raylab.registry.cards import render as render_card
from raylab.registry.cards import write as write_card
from raylab.registry.erasure import TAG as ERASURE_TAG
from raylab.registry.erasure import mark_pending as mark_erasure_pending
from raylab.registry.erasure import pending as erasures_pending
from raylab.registry.erasure import trained_on
from raylab.registry.live import LiveRun
from raylab.registry.store import PREVIOUS, PRODUCTION, Store, locate, model_name, open_store
from raylab.registry.tracking import (
    experiment_id,
    flatten,
    log_run,
    open_train_run,
    register_derived,
    track_sweep,
    track_train,
)
from raylab.registry.versions import (
    LINEAGE,
    IntegrityError,
    checksums,
    fetch,
    get_version,
    parse_ref,
    register,
    registered_model,
    remote_of,
    remote_tags,
    set_tags,
    verify,
    version_number,
    version_run,
    versions,
)

__all__ = [
    "add_card_section", "card_for", "download_card_files", "refresh_card", "render_card", "write_card",
    "ERASURE_TAG", "LINEAGE", "PREVIOUS", "PRODUCTION", "IntegrityError", "LiveRun", "Store", "alias_history", "checksums", "erasures_pending", "experiment_id",
    "fetch", "flatten",
    "get_version", "version_run", "locate", "log_run", "mark_erasure_pending", "model_name", "open_store", "open_train_run", "parse_ref", "promote", "register", "register_derived", "remote_of", "remote_tags",
    "registered_model", "rollback", "set_tags", "track_sweep", "track_train", "trained_on", "user", "verify", "version_number",
    "versions",
]
