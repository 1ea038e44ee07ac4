"""`raylab keys rotate`: a new key-encryption key for every sealed file under raylab's roots.

    raylab keys rotate --config configs/quickstart-governed.yaml
    raylab keys rotate --config job.yaml --path s3://bucket/raylab-runs --retire

The control-plane database's record-id key (core/lineage.py) is re-wrapped the same way.
Only the wrapping of each file's data key changes (raylab/core/crypto.py): a local key ring gets
a new active key and every file is re-wrapped under it; with aws-kms, KMS re-encrypts each data
key under the configured `kms_key` (ReEncrypt, after a change of key in the config or KMS's own
rotation), and the data key never leaves KMS. A file is replaced whole by an atomic rename, so an
interrupted rotation leaves every file readable (old keys stay in the ring until `--retire`) and
re-running it finishes the job.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylab.core import crypto, events, lineage, storage
from raylab.errors import UserError


@dataclass
class Rotation:
    key_id: str
    rewrapped: list[str]
    retired: list[str]
    record_key: bool = False  # the record-id key in the control-plane database was re-wrapped too


def rotate(settings: crypto.Settings | None, roots: list[str], retire: bool = False) -> Rotation:
    """Re-wrap every sealed file under `roots` (local paths or URIs) with a new key."""
    if settings is None:
        raise UserError("raylab keys rotate: encryption is off; set governance.encryption.enabled: true in the "
                        "config (--config) whose keys to rotate")
    prov = crypto.provider(settings)
    old_ids = []
    if isinstance(prov, crypto.LocalKeyRing):
        old_ids = sorted(prov._ring(create=True)["keys"])
        key_id = prov.rotate()
    else:
        key_id = prov.active_id()
    done = []
    for root in dict.fromkeys(roots):  # once each, in order
        for location in storage.sealed_files(root):
            storage.rewrap(location, settings)
            done.append(location)
    record_key = lineage.rewrap_key(settings) is not None  # the control-plane database's record-id key
    retiring = retire and isinstance(prov, crypto.LocalKeyRing)
    # audited before the old keys go, so a rotation that took effect is always on record
    events.emit("keys.rotate", provider=settings.provider, key_id=key_id, files=len(done), record_key=record_key,
                retire=retiring, previous=old_ids, roots=list(dict.fromkeys(roots)))
    retired = prov.retire(keep=key_id) if retiring else []
    return Rotation(key_id, done, retired, record_key)
