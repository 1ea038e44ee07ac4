"""The audit signing key (Ed25519, the `cryptography` library, or an AWS KMS key) and signed
checkpoints.

A checkpoint is a small JSON file `{length, head, time, key_id, signature}` at
`<checkpoints>/<length>.json`: an Ed25519 signature over the canonical JSON of
`{"chain": "raylab.audit", "length": N, "head": HASH}`. One is written after every append, so
a verifier holding the public key notices a chain shorter than a checkpoint (truncation) or
one whose entry N no longer has the signed hash (a consistent rewrite by someone without the key).

The private key is a PEM file readable only by its owner (0600), created on first use, at
governance.audit.signing_key / $RAYLAB_AUDIT_KEY / ~/.config/raylab/audit-ed25519.pem; its
public half is written beside it (`.pub`) for verifiers that should not hold the private key.
With governance.audit.kms_key, KMS signs instead (ECDSA P-256) and no key file exists.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
import stat

from raylab.core import runs, storage
from raylab.core.audit import canonical
from raylab.errors import UserError

log = logging.getLogger(__name__)
CHAIN = "raylab.audit"
_private: dict[str, object] = {}  # path -> loaded private key (per process)


def ensure_key(path: str) -> None:
    """Create the signing key at `path` if there is none, saying so (first use)."""
    if os.path.exists(path) or path in _private:
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if storage.create_private_file(path, pem):
        storage.create_private_file(path + ".pub", public_pem(key.public_key()))
        log.warning("raylab audit: created the audit signing key %s (mode 0600, key id %s). It signs the audit "
                    "log's checkpoints: keep it apart from the control-plane database and back it up; give "
                    "verifiers %s.pub", path, key_id(key.public_key()), path)


def private_key(path: str):
    """The signing key at `path` (a UserError names the file and what to fix)."""
    if path in _private:
        return _private[path]
    from cryptography.hazmat.primitives import serialization

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"audit signing key {path} does not exist (set governance.audit.signing_key or "
                        "$RAYLAB_AUDIT_KEY to the key's path)") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"audit signing key {path} is readable by others (mode {stat.S_IMODE(mode):04o}): "
                        f"run `chmod 600 {path}`")
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"audit signing key {path} is not an unencrypted PEM private key: {e}") from None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"audit signing key {path} is not an Ed25519 key")
    _private[path] = key
    return key


def public_pem(public) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(public) -> str:
    """The first 16 hex digits of sha256 over the raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public(path: str):
    """A public key from a PEM file: a public key, or a private key whose public half is used."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"audit public key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        if b"PRIVATE KEY" not in data:
            raise UserError(f"audit public key {path} is not a PEM key") from None
        key = private_key(path).public_key()
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"audit public key {path} is not an Ed25519 key")
    return key


def trusted_keys(key_path: str, extra: list[str] | tuple[str, ...] = (), kms_key: str | None = None) -> dict[str, object]:
    """key id -> public key: each file in `extra` (--public-key), else the signing key's .pub
    beside it, else the signing key itself. A UserError when there is none: verification needs a key."""
    if kms_key and not extra:
        ident, public = kms_public(kms_key)
        return {ident: public}
    paths = list(extra)
    if not paths:  # the public half first: verifying needs no secret
        if os.path.exists(key_path + ".pub"):
            paths = [key_path + ".pub"]
        elif os.path.exists(key_path):
            paths = [key_path]
        else:
            raise UserError(f"no audit key to verify checkpoints with: neither {key_path} nor {key_path}.pub exists "
                            "(give --public-key FILE, or set governance.audit.signing_key / $RAYLAB_AUDIT_KEY)")
    keys = [load_public(p) for p in paths]
    return {key_id(k): k for k in keys}


def message(length: int, head: str) -> bytes:
    return canonical.dumps({"chain": CHAIN, "length": length, "head": head})


def write_checkpoint(location: str, key_path: str, length: int, head: str, kms_key: str | None = None) -> str:
    """Sign (length, head) with the local key, or with AWS KMS when `kms_key` is set, and write
    the checkpoint; returns its location."""
    if kms_key:
        ident, signature = kms_sign(kms_key, message(length, head))
    else:
        key = private_key(key_path)
        ident, signature = key_id(key.public_key()), key.sign(message(length, head))
    record = {"chain": CHAIN, "length": length, "head": head, "key_id": ident,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
              "signature": base64.b64encode(signature).decode()}
    return storage.write_text(runs.audit_checkpoint(location, length), json.dumps(record, sort_keys=True) + "\n")


def read_checkpoints(location: str) -> list[tuple[str, dict | None]]:
    """(file, record or None when unreadable) for every checkpoint under `location`."""
    out = []
    for path in storage.list_files(location, ".json"):
        try:
            record = json.loads(storage.read_text(path))
            if not isinstance(record, dict):
                record = None
        except (ValueError, UnicodeDecodeError):
            record = None
        out.append((path, record))
    return out


def signature_ok(record: dict, keys: dict[str, object]) -> bool:
    """Whether a checkpoint carries a valid signature by one of `keys` over its length and head."""
    from cryptography.exceptions import InvalidSignature

    try:
        length, head = int(record["length"]), str(record["head"])
        signature = base64.b64decode(record["signature"], validate=True)
    except (KeyError, TypeError, ValueError):
        return False
    key = keys.get(record.get("key_id"))
    if key is None:
        return False
    try:
        if str(record.get("key_id")).startswith("kms:"):
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import ec

            key.verify(signature, message(length, head), ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, message(length, head))
        return True
    except InvalidSignature:
        return False


# ---------------------------------------------------------------- AWS KMS (a key that never leaves KMS)
# An asymmetric KMS key (KeySpec ECC_NIST_P256, KeyUsage SIGN_VERIFY) signs with ECDSA_SHA_256
# through KMS's Sign API; verifiers fetch its public key once (GetPublicKey) and check locally.
# boto3 is the `s3` extra; AWS credentials, region and AWS_ENDPOINT_URL come from the environment.
_kms: dict[str, tuple[str, object]] = {}  # configured key -> (its ARN, public key)


def _kms_client():
    try:
        import boto3
    except ImportError:
        raise UserError("governance.audit.kms_key needs boto3: pip install 'raylab[s3]'") from None
    return boto3.client("kms")


def kms_public(kms_key: str) -> tuple[str, object]:
    """("kms:<key ARN>", its public key), checking the key can sign ECDSA_SHA_256."""
    if kms_key in _kms:
        return _kms[kms_key]
    from botocore.exceptions import BotoCoreError, ClientError
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    client = _kms_client()
    try:
        meta = client.describe_key(KeyId=kms_key)["KeyMetadata"]
        if meta.get("KeyUsage") != "SIGN_VERIFY" or meta.get("KeySpec") != "ECC_NIST_P256":
            raise UserError(f"governance.audit.kms_key {kms_key}: expected an ECC_NIST_P256 SIGN_VERIFY key, "
                            f"got {meta.get('KeySpec')} {meta.get('KeyUsage')}")
        public = load_der_public_key(client.get_public_key(KeyId=kms_key)["PublicKey"])
    except (BotoCoreError, ClientError) as e:
        raise UserError(f"governance.audit.kms_key {kms_key}: {e}") from None
    _kms[kms_key] = ("kms:" + meta["Arn"], public)
    return _kms[kms_key]


def kms_sign(kms_key: str, data: bytes) -> tuple[str, bytes]:
    from botocore.exceptions import BotoCoreError, ClientError

    ident, _ = kms_public(kms_key)
    try:
        out = _kms_client().sign(KeyId=kms_key, Message=data, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")
    except (BotoCoreError, ClientError) as e:
        raise UserError(f"governance.audit.kms_key {kms_key}: signing failed: {e}") from None
    return ident, out["Signature"]
