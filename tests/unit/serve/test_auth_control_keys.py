"""The inference endpoint accepts the control-plane database's API keys (`raylab keys create`,
serve.api_keys_db) beside its static keys: a valid key answers, a revoked or unknown one is a
401 in OpenAI's shape and an access.deny entry in the audit log. No Ray: the ingress runs in
FastAPI's TestClient on a real SQLite database.

    pytest tests/unit/serve/test_auth_control_keys.py
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from raylab.core import audit, controldb, events
from raylab.core.access import keys
from raylab.serve.app import ROUTERS, IngressImpl, create_app
from raylab.serve.auth import STATIC, authenticate

LIMITS = {"max_prompt_tokens": 64, "max_tokens": 32, "max_request_bytes": 2000, "max_batch_size": 4,
          "batch_wait_timeout_s": 0.0, "max_adapters_per_replica": 2}
CATALOG = {"routes": {"m": "m/1", "m/1": "m/1"}, "listed": ["m", "m/1"], "default": "m/1"}


class Ingress(IngressImpl):
    def _catalog(self, default: str) -> dict:
        return CATALOG


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "_writer", lambda: None)  # this process's audit settings, not a session Ray's
    url = f"sqlite:///{tmp_path / 'control.db'}"
    monkeypatch.setenv("RAYLAB_DATABASE_URL", url)
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    monkeypatch.setenv("RAYLAB_AUDIT_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.delenv("RAYLAB_AUDIT", raising=False)
    monkeypatch.setenv("RAYLAB_UNIT_STATIC_KEYS", "sk-static")
    yield url
    controldb.dispose_all()


def test_the_endpoint_accepts_control_plane_keys_until_revoked(db):
    key, row = keys.create(db, "acme", "viewer", "bob", by="root@host")
    impl = Ingress(generator=None, args={"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_STATIC_KEYS",
                                          "api_keys_database": db})
    impl.reconfigure(CATALOG)
    client = TestClient(create_app(ROUTERS, impl))

    def status(token: str) -> int:
        return client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code

    assert status(key) == 200 and status("sk-static") == 200
    assert status("rlk_000000000000_" + key[17:]) == 401  # a well-formed key nobody made
    keys.revoke(db, row["key_id"], by="root@host")
    denied = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert status("sk-static") == 200  # the static keys are untouched

    # Without api_keys_database the same well-formed key is just an unknown static key.
    plain = Ingress(generator=None, args={"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_STATIC_KEYS"})
    assert authenticate(f"Bearer {key}", plain.keys, None) is None
    assert authenticate("Bearer sk-static", plain.keys, None) == STATIC

    reasons = [e["fields"]["reason"] for e in audit.entries(audit.Settings.from_env(), audit.Filter(kinds=("access",)))]
    assert reasons == ["unknown key id 000000000000", f"key id {row['key_id']} was revoked at "
                       + keys.listing(db, include_revoked=True)[0]["revoked"]]
