"""Encryption at rest (raylab/core/crypto.py through raylab/core/storage.py): sealed files hold
no plaintext and round-trip; an edited, truncated, extended, renamed or wrongly keyed file fails
with a UserError naming it and the key; rotation re-wraps without touching the ciphertext;
AWS KMS (moto's server on loopback) makes, unwraps and re-wraps the data keys."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylab.core import crypto, storage
from raylab.errors import UserError

SECRET = "canary-7f3a9 the quarterly numbers"


@pytest.fixture
def local_key(tmp_path, monkeypatch):
    ring = tmp_path / "keys" / "ring.json"
    settings = crypto.Settings("local", key_file=str(ring))
    monkeypatch.setenv(crypto.ENV, settings.to_env())
    crypto._deks.clear()
    yield settings
    crypto._deks.clear()


def test_sealed_file_round_trips_and_holds_no_plaintext(local_key, tmp_path, monkeypatch):
    monkeypatch.setattr(crypto, "SEGMENT", 64)  # many segments from a short text
    text = (SECRET + "\n") * 20
    where = storage.write_text(str(tmp_path / "run" / "report.md"), text)
    raw = (tmp_path / "run" / "report.md").read_bytes()
    assert crypto.is_sealed(raw) and SECRET.encode() not in raw
    assert storage.read_text(where) == text
    # checksums are over plaintext, so they survive rotation (DESIGN.md)
    assert storage.sha256(where) == hashlib.sha256(text.encode()).hexdigest()
    ring = json.loads((tmp_path / "keys" / "ring.json").read_text())
    assert oct(os.stat(tmp_path / "keys" / "ring.json").st_mode & 0o777) == "0o600" and len(ring["keys"]) == 1


def test_plaintext_control_the_same_write_without_encryption_holds_the_secret(tmp_path, monkeypatch):
    monkeypatch.delenv(crypto.ENV, raising=False)
    storage.write_text(str(tmp_path / "report.md"), SECRET)
    assert SECRET.encode() in (tmp_path / "report.md").read_bytes()


@pytest.mark.parametrize("damage", ["edit", "truncate", "drop_last_segment", "extend"])
def test_damaged_file_fails_naming_it(local_key, tmp_path, monkeypatch, damage):
    monkeypatch.setattr(crypto, "SEGMENT", 32)
    path = tmp_path / "shard.bin"
    storage.write_bytes(str(path), SECRET.encode() * 4)
    raw = path.read_bytes()
    header, packed = crypto.read_header(io.BytesIO(raw).read)
    body = raw[len(packed):]
    segment = header["seg"] + 16
    damaged = {"edit": raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:],
               "truncate": raw[:-7],
               "drop_last_segment": packed + body[: (len(body) - 1) // segment * segment],
               "extend": raw + raw[len(packed): len(packed) + segment]}[damage]
    path.write_bytes(damaged)
    with pytest.raises(UserError, match=r"shard\.bin.*(authentication tag|truncated)"):
        storage.read_bytes(str(path))


def test_renamed_file_fails_and_a_wrong_key_names_the_key(local_key, tmp_path, monkeypatch):
    storage.write_bytes(str(tmp_path / "a.parquet"), b"A" * 100)
    storage.write_bytes(str(tmp_path / "b.parquet"), b"B" * 100)
    a, b = (tmp_path / "a.parquet").read_bytes(), (tmp_path / "b.parquet").read_bytes()
    (tmp_path / "a.parquet").write_bytes(b)  # swapped
    with pytest.raises(UserError, match=r"a\.parquet: this file was encrypted as 'b\.parquet'"):
        storage.read_bytes(str(tmp_path / "a.parquet"))
    (tmp_path / "a.parquet").write_bytes(a)
    assert storage.read_bytes(str(tmp_path / "a.parquet")) == b"A" * 100  # control: restored, it reads
    kid = json.loads((tmp_path / "keys" / "ring.json").read_text())["active"]
    crypto._deks.clear()
    monkeypatch.setenv(crypto.ENV, crypto.Settings("local", key_file=str(tmp_path / "other.json")).to_env())
    with pytest.raises(UserError, match=rf"a\.parquet: encrypted with key {kid} .*not in the key ring"):
        storage.read_bytes(str(tmp_path / "a.parquet"))


def test_parquet_events_and_model_directories(local_key, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    table = pa.table({"text": [SECRET, "other"], "n": [1, 2]})
    with open(tmp_path / "x.parquet", "wb") as f:
        storage.write_table_to(table, f, name="x.parquet", settings=local_key)
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(tmp_path / "x.parquet")  # not Parquet without the key
    assert storage.read_table(str(tmp_path)).to_pylist() == table.to_pylist()

    events = str(tmp_path / "events.jsonl")
    storage.append_text(events, json.dumps({"kind": "a", "note": SECRET}) + "\n")
    storage.append_text(events, json.dumps({"kind": "b"}) + "\n")
    assert SECRET.encode() not in (tmp_path / "events.jsonl").read_bytes()
    assert [json.loads(x)["kind"] for x in storage.read_text(events).splitlines()] == ["a", "b"]

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    storage.save_pretrained(model, str(tmp_path / "model"))
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert "model.safetensors" in files and all(storage.is_sealed_file(str(tmp_path / "model" / f)) for f in files)
    with storage.plain_dir(str(tmp_path / "model")) as plain:
        assert plain != str(tmp_path / "model")
        loaded = LlamaForCausalLM.from_pretrained(plain)
    assert not os.path.exists(plain)  # the plaintext copy is gone after loading
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))
    with storage.plain_dir(str(tmp_path / "plain-control")) as p:  # not a directory: passed through
        assert p == str(tmp_path / "plain-control")


def test_rotation_rewraps_without_touching_ciphertext(local_key, tmp_path):
    where = str(tmp_path / "adapter_model.safetensors")
    storage.write_bytes(where, SECRET.encode())
    events = str(tmp_path / "events.jsonl")
    (tmp_path / "events.jsonl").write_text('{"kind": "plain"}\n')  # appended before encryption was on
    storage.append_text(events, '{"kind": "a"}\n')
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    old, _ = crypto.read_header(io.BytesIO(before).read)
    ring = crypto.LocalKeyRing(local_key.key_file)
    new_kid = ring.rotate()
    assert sorted(storage.sealed_files(str(tmp_path))) == sorted([where, events])
    assert storage.rewrap(where, local_key) and storage.rewrap(events, local_key)
    after = (tmp_path / "adapter_model.safetensors").read_bytes()
    new, packed = crypto.read_header(io.BytesIO(after).read)
    assert new["kek"] == new_kid != old["kek"] and after[len(packed):] == before[-len(after[len(packed):]):]
    # the old key is dropped from the ring: the files still open, so they no longer need it
    data = json.loads(open(local_key.key_file).read())
    del data["keys"][old["kek"]]
    crypto._write_private(local_key.key_file, json.dumps(data).encode(), replace=True)
    crypto._deks.clear()
    assert storage.read_bytes(where) == SECRET.encode()
    assert [json.loads(x)["kind"] for x in storage.read_text(events).splitlines()] == ["plain", "a"]


@pytest.fixture
def kms_server(monkeypatch):
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    crypto._deks.clear()
    crypto._kms.cache_clear()
    yield f"http://{host}:{port}"
    server.stop()
    crypto._deks.clear()
    crypto._kms.cache_clear()


def test_aws_kms_seals_opens_and_rotates(kms_server, tmp_path, monkeypatch):
    import boto3

    kms = boto3.client("kms", endpoint_url=kms_server)
    first_id, second_id = (kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(2))
    first, second = (kms.describe_key(KeyId=k)["KeyMetadata"]["Arn"] for k in (first_id, second_id))
    settings = crypto.Settings("aws-kms", kms_key=first, kms_endpoint=kms_server)
    monkeypatch.setenv(crypto.ENV, settings.to_env())
    where = storage.write_text(str(tmp_path / "report.json"), SECRET)
    assert SECRET.encode() not in (tmp_path / "report.json").read_bytes()
    crypto._deks.clear()
    assert storage.read_text(where) == SECRET  # unwrapped by KMS Decrypt
    header, _ = crypto.read_header(open(where, "rb").read)
    assert header["provider"] == "aws-kms" and header["kek"] == first

    to_second = crypto.Settings("aws-kms", kms_key=second, kms_endpoint=kms_server)
    assert storage.rewrap(where, to_second)  # KMS ReEncrypt: the data key never leaves KMS
    header, _ = crypto.read_header(open(where, "rb").read)
    assert header["kek"] == second
    kms.schedule_key_deletion(KeyId=first_id, PendingWindowInDays=7)  # the old key is no longer needed
    crypto._deks.clear()
    assert storage.read_text(where) == SECRET
    # A process whose KMS does not hold the key (another account or region): exit 2 naming file and key.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    crypto._deks.clear()
    crypto._kms.cache_clear()
    with pytest.raises(UserError, match=rf"report\.json: encrypted with key {second}"):
        storage.read_text(where)


def test_config_names_what_to_fix():
    from raylab.config.governance import EncryptionConfig

    with pytest.raises(ValueError, match="kms_key"):
        EncryptionConfig(enabled=True, provider="aws-kms")
    with pytest.raises(ValueError, match="must be a local file"):
        EncryptionConfig(enabled=True, key_file="s3://bucket/keys.json")
    assert EncryptionConfig(enabled=True, provider="aws-kms", kms_key="alias/x").kms_key == "alias/x"


def test_rotate_rewraps_a_tree_audits_then_retires(local_key, tmp_path, monkeypatch):
    from raylab.core import rotation, runs

    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYLAB_AUDIT", "0")  # the events file is enough here; the audit chain has its own tests
    storage.write_text(str(tmp_path / "run" / "data" / "manifest.json"), SECRET)
    old = crypto.LocalKeyRing(local_key.key_file).active_id()
    done = rotation.rotate(local_key, [str(tmp_path / "run")], retire=True)
    assert done.retired == [old] and done.key_id != old and len(done.rewrapped) == 1
    crypto._deks.clear()
    assert storage.read_text(str(tmp_path / "run" / "data" / "manifest.json")) == SECRET
    logged = [json.loads(x) for f in storage.list_files(str(runs.home().root / "events"), ".jsonl")
              for x in storage.read_text(f).splitlines()]
    assert [e["fields"]["files"] for e in logged if e["kind"] == "keys.rotate"] == [1]
    with pytest.raises(UserError, match="encryption is off"):
        rotation.rotate(None, [str(tmp_path / "run")])
