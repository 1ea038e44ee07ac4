"""Encryption at rest: envelope encryption of every file raylab writes (`governance.encryption`).

    governance:
      encryption: {enabled: true, provider: local, key_file: ~/.config/raylab/data-keys.json}
      encryption: {enabled: true, provider: aws-kms, kms_key: alias/raylab-data}

Each file gets a fresh 256-bit data key (DEK). The body is AES-256-GCM in 1 MiB segments
(the STREAM construction Tink and age use: nonce = random 7-byte prefix, a 4-byte segment
counter and a last-segment flag), so a file of any size is encrypted and decrypted a segment
at a time, and a truncated, reordered or extended body fails its tags. The DEK is wrapped by a
key-encryption key (KEK) from a provider and kept in the file's header:

    MAGIC | u32 length | header JSON {v, alg, seg, prefix, name, provider, kek, dek}

Every segment's associated data is MAGIC plus the header's fixed part (version, algorithm,
segment size, nonce prefix and the file's *name*), so a file renamed or swapped for another of a
different name fails, while `raylab keys rotate` may rewrite the wrapping (`kek`, `dek`) without
touching the ciphertext. The name, not the full path, is the identity: a run directory copied
into the registry or a staging directory stays readable; a swap between two directories under
the same name is what the manifests' plaintext checksums catch.

Providers: `local` keeps KEKs in a JSON key ring (mode 0600, apart from the data, created on
first use; AES key wrap, RFC 3394); `aws-kms` asks KMS for each data key (GenerateDataKey) and
to unwrap it (Decrypt), so no KEK is ever on disk; rotation re-wraps with ReEncrypt.

Which processes encrypt: the config's section is put in $RAYLAB_ENCRYPTION (JSON, no secrets:
a key ring's path or a KMS key id) for raylab and every Ray worker it starts (`process_env`);
`raylab.core.storage` seals what it writes and opens what it reads while it is set, and opens
sealed files whenever it meets them (a missing or wrong key is a UserError naming the file
and the key id).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raylab.errors import UserError

if TYPE_CHECKING:
    from raylab.config import RaylabConfig

ENV = "RAYLAB_ENCRYPTION"
MAGIC = b"\x89RLE1\r\n\x1a"  # PNG-style: a text-mode transfer or a truncated header is caught early
SEGMENT = 1 << 20
_TAG = 16
_ALG = "AES-256-GCM-STREAM"


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    provider: str                  # local | aws-kms
    key_file: str | None = None    # local: the key ring's path
    kms_key: str | None = None     # aws-kms: key id, ARN or alias
    kms_endpoint: str | None = None

    def to_env(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if v is not None}, sort_keys=True)


def key_file_default() -> str:
    """The local key ring's default path: the user's config directory, not $RAYLAB_HOME,
    so the keys do not sit beside the data they protect."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config_home, "raylab", "data-keys.json")


def process_env(cfg: RaylabConfig | None) -> dict[str, str]:
    """$RAYLAB_ENCRYPTION as the config sets it (or as inherited when there is no config)."""
    if cfg is None:
        return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}
    enc = cfg.governance.encryption
    if not enc.enabled:
        return {}
    key_file = os.path.abspath(os.path.expanduser(enc.key_file or key_file_default())) if enc.provider == "local" else None
    return {ENV: Settings(enc.provider, key_file, enc.kms_key, enc.kms_endpoint).to_env()}


def settings_of(cfg: RaylabConfig) -> Settings | None:
    """The settings a config's `governance.encryption` gives, or None when it is off."""
    raw = process_env(cfg).get(ENV)
    return _parse(raw) if raw else None


def active() -> Settings | None:
    """The settings this process writes with, or None when encryption is off."""
    raw = os.environ.get(ENV)
    return _parse(raw) if raw else None


@functools.lru_cache(maxsize=8)
def _parse(raw: str) -> Settings:
    return Settings(**json.loads(raw))


# ---------------------------------------------------------------- providers


class LocalKeyRing:
    """KEKs in a JSON file {"active": id, "keys": {id: base64}}; `rotate` adds one and makes it
    active, keeping the old ones so files not yet re-wrapped stay readable."""

    name = "local"

    def __init__(self, path: str):
        self.path = path

    def _ring(self, create: bool) -> dict:
        if not os.path.exists(self.path):
            if not create:
                return {"active": None, "keys": {}}
            _write_private(self.path, json.dumps(_new_ring_entry({"keys": {}})).encode(), replace=False)
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def wrap(self, dek: bytes | None) -> tuple[bytes, str, bytes]:
        """(DEK, KEK id, wrapped DEK); a fresh DEK when `dek` is None."""
        from cryptography.hazmat.primitives.keywrap import aes_key_wrap

        ring = self._ring(create=True)
        kid = ring["active"]
        dek = dek or os.urandom(32)
        return dek, kid, aes_key_wrap(base64.b64decode(ring["keys"][kid]), dek)

    def unwrap(self, kid: str, wrapped: bytes) -> bytes:
        from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

        keys = self._ring(create=False)["keys"]
        if kid not in keys:
            raise KeyError(f"key {kid} is not in the key ring {self.path}")
        try:
            return aes_key_unwrap(base64.b64decode(keys[kid]), wrapped)
        except InvalidUnwrap:
            raise KeyError(f"key {kid} in {self.path} does not unwrap this file's data key") from None

    def rotate(self) -> str:
        """A new active KEK in the ring (written atomically, mode 0600); returns its id."""
        ring = _new_ring_entry(self._ring(create=True))
        _write_private(self.path, json.dumps(ring).encode(), replace=True)
        return ring["active"]

    def active_id(self) -> str:
        return self._ring(create=True)["active"]

    def retire(self, keep: str) -> list[str]:
        """Drop every key but `keep` from the ring (after a rotation re-wrapped every file
        there is: a file still wrapped by a dropped key can never be opened again)."""
        ring = self._ring(create=True)
        gone = sorted(k for k in ring["keys"] if k != keep)
        _write_private(self.path, json.dumps({"active": keep, "keys": {keep: ring["keys"][keep]}}).encode(), replace=True)
        return gone


def _write_private(path: str, data: bytes, replace: bool) -> None:
    """A key ring written atomically, mode 0600 in a 0700 directory. Written here, not by
    raylab.core.storage: storage seals what it writes with these very keys (and imports this
    module), and a key ring sealed by itself could never be opened."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if another process created it first: that ring wins
    except FileExistsError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _new_ring_entry(ring: dict) -> dict:
    key = os.urandom(32)
    import hashlib

    kid = "local-" + hashlib.sha256(key).hexdigest()[:12]  # an id, not a secret: 48 bits of a hash
    return {"active": kid, "keys": {**ring["keys"], kid: base64.b64encode(key).decode()}}


class AwsKms:
    """Data keys from AWS KMS (boto3; credentials and region from the environment, the
    endpoint from `kms_endpoint` or $AWS_ENDPOINT_URL_KMS, e.g. a VPC endpoint)."""

    name = "aws-kms"

    def __init__(self, key: str, endpoint: str | None):
        self.key, self.endpoint = key, endpoint

    @functools.cached_property
    def client(self):
        try:
            import boto3
        except ImportError:
            raise UserError("governance.encryption.provider aws-kms needs boto3: pip install 'raylab[s3]'") from None
        return boto3.client("kms", endpoint_url=self.endpoint) if self.endpoint else boto3.client("kms")

    def wrap(self, dek: bytes | None) -> tuple[bytes, str, bytes]:
        if dek is not None:  # a local ring's DEK moving to KMS (`raylab keys rotate`)
            out = self._call("Encrypt", self.key, KeyId=self.key, Plaintext=dek)
            return dek, out["KeyId"], out["CiphertextBlob"]
        out = self._call("GenerateDataKey", self.key, KeyId=self.key, KeySpec="AES_256")
        return out["Plaintext"], out["KeyId"], out["CiphertextBlob"]

    def unwrap(self, kid: str, wrapped: bytes) -> bytes:
        return self._call("Decrypt", kid, CiphertextBlob=wrapped, KeyId=kid)["Plaintext"]

    def rewrap(self, kid: str, wrapped: bytes) -> tuple[str, bytes]:
        """(new key id, wrapped DEK) under `self.key`, without the DEK leaving KMS."""
        out = self._call("ReEncrypt", kid, CiphertextBlob=wrapped, SourceKeyId=kid, DestinationKeyId=self.key)
        return out["KeyId"], out["CiphertextBlob"]

    def active_id(self) -> str:
        return self._call("DescribeKey", self.key, KeyId=self.key)["KeyMetadata"]["Arn"]

    def _call(self, op: str, kid: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        method = {"GenerateDataKey": "generate_data_key", "Encrypt": "encrypt", "Decrypt": "decrypt",
                  "ReEncrypt": "re_encrypt", "DescribeKey": "describe_key"}[op]
        try:
            return getattr(self.client, method)(**kwargs)
        except ClientError as e:
            raise KeyError(f"KMS {op} with key {kid}: {e.response['Error'].get('Code')}: "
                           f"{e.response['Error'].get('Message')}") from None
        except BotoCoreError as e:
            raise KeyError(f"KMS {op} with key {kid}: {e}") from None


def provider(settings: Settings):
    if settings.provider == "local":
        return _local(settings.key_file or key_file_default())
    return _kms(settings.kms_key, settings.kms_endpoint)


@functools.lru_cache(maxsize=4)
def _local(path: str) -> LocalKeyRing:
    return LocalKeyRing(path)


@functools.lru_cache(maxsize=4)
def _kms(key: str, endpoint: str | None) -> AwsKms:
    return AwsKms(key, endpoint)


# ---------------------------------------------------------------- the format


def is_sealed(head: bytes) -> bool:
    return head.startswith(MAGIC)


def _fixed(header: dict) -> bytes:
    """The associated data: what no rotation may change."""
    fixed = {k: header[k] for k in ("v", "alg", "seg", "prefix", "name")}
    return MAGIC + json.dumps(fixed, sort_keys=True, separators=(",", ":")).encode()


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">I", counter) + (b"\x01" if last else b"\x00")


def _pack_header(header: dict) -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(body)) + body


def seal_chunks(chunks: Iterable[bytes], name: str, settings: Settings) -> Iterator[bytes]:
    """Encrypt a stream of plaintext chunks (any sizes) as one file named `name`: yields the
    header, then each sealed segment."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    prov = provider(settings)
    dek, kid, wrapped = _wrap(prov)
    prefix = os.urandom(7)
    header = {"v": 1, "alg": _ALG, "seg": SEGMENT, "prefix": base64.b64encode(prefix).decode(),
              "name": name, "provider": prov.name, "kek": kid, "dek": base64.b64encode(wrapped).decode()}
    yield _pack_header(header)
    aes, aad = AESGCM(dek), _fixed(header)
    counter, pending = 0, b""
    for chunk in chunks:
        pending += chunk
        while len(pending) > SEGMENT:  # keep one segment back: only the last one is flagged
            yield aes.encrypt(_nonce(prefix, counter, False), pending[:SEGMENT], aad)
            pending, counter = pending[SEGMENT:], counter + 1
    yield aes.encrypt(_nonce(prefix, counter, True), pending, aad)


def _wrap(prov) -> tuple[bytes, str, bytes]:
    try:
        return prov.wrap(None)
    except KeyError as e:
        raise UserError(f"governance.encryption: cannot make a data key: {e.args[0]}") from None


def seal(data: bytes, name: str, settings: Settings) -> bytes:
    return b"".join(seal_chunks([data], name, settings))


def read_header(read) -> tuple[dict, bytes]:
    """(header, its packed bytes) from a `read(n)` callable positioned at the file's start."""
    head = read(len(MAGIC) + 4)
    if not is_sealed(head) or len(head) < len(MAGIC) + 4:
        raise ValueError("not a raylab-encrypted file")
    (n,) = struct.unpack(">I", head[len(MAGIC):])
    body = read(n)
    return json.loads(body), head + body


def open_chunks(read, name: str, where: str) -> Iterator[bytes]:
    """Decrypt a sealed file read through `read(n)`; `where` names it in errors."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header, _ = read_header(read)
    aes = AESGCM(data_key(header, where))
    prefix, aad, seg = base64.b64decode(header["prefix"]), _fixed(header), header["seg"] + _TAG
    if header["name"] != name:
        raise UserError(f"{where}: this file was encrypted as {header['name']!r}: it was renamed or swapped "
                        "for another file; restore the original")
    counter, block = 0, read(seg)
    while True:
        following = read(seg)
        last = not following
        try:
            yield aes.decrypt(_nonce(prefix, counter, last), block, aad)
        except InvalidTag:
            raise UserError(f"{where}: segment {counter} fails its authentication tag: the file was truncated, "
                            f"edited or swapped (key {header['kek']})") from None
        if last:
            return
        block, counter = following, counter + 1


def open_sealed(blob: bytes, name: str, where: str) -> bytes:
    import io

    return b"".join(open_chunks(io.BytesIO(blob).read, name, where))


_deks: dict[tuple[str, str, str], bytes] = {}  # unwrapped DEKs of this process (a KMS call each otherwise)


def data_key(header: dict, where: str) -> bytes:
    cache_key = (header["provider"], header["kek"], header["dek"])
    if cache_key in _deks:
        return _deks[cache_key]
    settings = active()
    if header["provider"] == "local":
        path = settings.key_file if settings and settings.provider == "local" and settings.key_file else key_file_default()
        prov = _local(path)
    else:
        endpoint = settings.kms_endpoint if settings and settings.provider == "aws-kms" else None
        prov = _kms(header["kek"], endpoint or os.environ.get("AWS_ENDPOINT_URL_KMS"))
    try:
        dek = prov.unwrap(header["kek"], base64.b64decode(header["dek"]))
    except KeyError as e:
        raise UserError(f"{where}: encrypted with key {header['kek']} ({header['provider']}), which this "
                        f"process cannot use: {e.args[0]}; set governance.encryption to the key it was "
                        "written with") from None
    if len(_deks) > 4096:
        _deks.clear()
    _deks[cache_key] = dek
    return dek


def rewrap_header(header: dict, settings: Settings, where: str) -> dict:
    """The same header with its DEK wrapped by `settings`' active KEK (the data untouched)."""
    prov = provider(settings)
    if prov.name == "aws-kms" and header["provider"] == "aws-kms":
        try:
            kid, wrapped = prov.rewrap(header["kek"], base64.b64decode(header["dek"]))
        except KeyError as e:
            raise UserError(f"{where}: cannot re-wrap: {e.args[0]}") from None
    else:  # unwrap with the old KEK, wrap with the new one: the DEK (and so the data) stays
        try:
            _, kid, wrapped = prov.wrap(data_key(header, where))
        except KeyError as e:
            raise UserError(f"{where}: cannot re-wrap: {e.args[0]}") from None
    return {**header, "provider": prov.name, "kek": kid, "dek": base64.b64encode(wrapped).decode()}


def pack_header(header: dict) -> bytes:
    return _pack_header(header)
