"""Checkpoints signed by an AWS KMS key (Sign / GetPublicKey), against moto's KMS: no private
key on disk, a sound chain verifies, a rewritten one or a checkpoint signed by another key
does not, and a key that cannot sign is a user error naming governance.audit.kms_key."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from raylab.core import audit, controldb, events
from raylab.core.audit import chain, keys
from raylab.errors import UserError


@pytest.fixture
def kms(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE", "RAYLAB_DATABASE_URL", "RAYLAB_AUDIT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    monkeypatch.setenv("RAYLAB_AUDIT_CHECKPOINTS", str(tmp_path / "checkpoints"))
    with moto.mock_aws():
        import boto3

        client = boto3.client("kms")
        key = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
        client.create_alias(AliasName="alias/raylab-audit", TargetKeyId=key["KeyId"])
        yield client, key
    keys._kms.clear()
    controldb.dispose_all()


def test_kms_signs_and_verify_checks(kms, tmp_path, monkeypatch):
    _, key = kms
    monkeypatch.setenv("RAYLAB_AUDIT_KMS_KEY", "alias/raylab-audit")
    for i in range(4):
        events.emit("registry.promote", model="acme", version=i)
    assert not (tmp_path / "keys" / "audit.pem").exists()  # nothing to steal on disk
    s = audit.Settings.from_env()
    cp = json.loads(sorted((tmp_path / "checkpoints").glob("*.json"))[-1].read_text())
    assert cp["key_id"] == "kms:" + key["Arn"] and cp["length"] == 4
    report = audit.verify(s)
    assert report.ok and report.checkpoints == 4, report.problems

    # A forger without KMS access rebuilds the chain from entry 3 ...
    eng = controldb.engine(s.database)
    with eng.begin() as conn:
        rows = list(conn.execute(sa.select(chain.audit_log).order_by(chain.audit_log.c.seq)))
        prev = rows[1].hash
        for row in rows[2:]:
            body = {**chain.body_of(row), "prev": prev, "actor": "mallory@evil"}
            new = chain.entry_hash(body)
            conn.execute(sa.update(chain.audit_log).where(chain.audit_log.c.seq == row.seq)
                         .values(prev_hash="x" + str(row.seq), hash="y" + str(row.seq)))
            conn.execute(sa.update(chain.audit_log).where(chain.audit_log.c.seq == row.seq)
                         .values(prev_hash=prev, hash=new, actor="mallory@evil"))
            prev = new
    report = audit.verify(s)
    assert (report.problems[0].entry, report.problems[0].reason) == (3, "rewritten")
    # ... and signs new checkpoints with a key of their own: not the KMS key.
    forger = str(tmp_path / "forger.pem")
    keys.ensure_key(forger)
    for row in chain.rows(s)[2:]:
        keys.write_checkpoint(s.checkpoints, forger, row.seq, row.hash)
    report = audit.verify(s)
    assert (report.problems[0].entry, report.problems[0].reason) == (3, "forged-checkpoint")


def test_a_key_that_cannot_sign_is_named(kms, monkeypatch):
    client, _ = kms
    wrong = client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    monkeypatch.setenv("RAYLAB_AUDIT_KMS_KEY", wrong)
    with pytest.raises(UserError, match="governance.audit.kms_key .*ECC_NIST_P256 SIGN_VERIFY"):
        events.emit("serve.stop", model="acme")
    monkeypatch.setenv("RAYLAB_AUDIT_KMS_KEY", "alias/missing")
    keys._kms.clear()
    with pytest.raises(UserError, match="governance.audit.kms_key alias/missing"):
        events.emit("serve.stop", model="acme")
    assert list(audit.entries(audit.Settings.from_env())) == []  # nothing landed unsigned
