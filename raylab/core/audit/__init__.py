"""The tamper-evident audit log: every state change `core.events` records, appended to a
sha256 hash chain in the control-plane database, with Ed25519-signed checkpoints.

    from raylab.core import audit
    s = audit.Settings.from_env()                  # database, key, checkpoint location
    audit.append(event_record, s)                  # what core.events does for every event
    report = audit.verify(s); report.ok, report.problems[0].message
    for e in audit.entries(s, audit.Filter(kinds=("registry",))): ...

From the shell: `raylab audit verify|log|export` (raylab/cli/governance.py). The threat model is in the
docs/governance.md. Modules: canonical (RFC 8785 JSON), chain (table, append, queries),
keys (signing key, checkpoints), check (verify), settings (where things live). Importing this package
is cheap: SQLAlchemy and cryptography load when a function needs them.
"""

from __future__ import annotations

from raylab.core.audit.settings import Settings, process_env


def append(record: dict, settings: Settings) -> dict:
    from raylab.core.audit import chain

    return chain.append(record, settings)


def entries(settings: Settings, flt=None):
    from raylab.core.audit import chain

    return chain.entries(settings, flt)


def verify(settings: Settings, public_keys=()):
    from raylab.core.audit import check

    return check.verify(settings, public_keys)


def ensure_key(path: str) -> None:
    from raylab.core.audit import keys

    keys.ensure_key(path)


def Filter(**kwargs):  # noqa: N802 - reads as the class it returns
    from raylab.core.audit import chain

    return chain.Filter(**kwargs)


__all__ = ["Settings", "process_env", "append", "entries", "verify", "ensure_key", "Filter"]
