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


def test_the_endpoint_accepts_oidc_tokens_with_serve_oidc(db, tmp_path, monkeypatch):
    """serve.oidc: a JWT from governance.oidc's issuer answers with the role its claims name;
    an expired, foreign-signed or role-less token is refused (401 / 403, audited), and the
    static keys still work. The control: the same valid token on an endpoint without
    serve.oidc is a 401."""
    import json
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from raylab import config
    from raylab.serve.deploy import oidc_args

    issuer, audience = "https://login.acme.example/realms/acme", "raylab"
    private, stranger = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [public | {"kid": "k1", "use": "sig", "alg": "RS256"}]}))
    raw = {"version": 1, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "preset:tiny-llama"},
           "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
           "serve": {"host": "0.0.0.0", "oidc": True},  # tokens alone are enough for a host others reach
           "governance": {"oidc": {"issuer": issuer, "audience": audience, "jwks_file": str(tmp_path / "jwks.json")}}}
    cfg = config.load_dict(raw)
    assert oidc_args(cfg)["issuer"] == issuer and oidc_args(config.load_dict(raw | {"serve": {}})) is None
    args = {"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_STATIC_KEYS", "oidc": oidc_args(cfg)}

    def token(key=private, **claims) -> str:
        now = int(time.time())
        body = {"iss": issuer, "aud": audience, "sub": "dana", "org": "acme", "iat": now, "exp": now + 600,
                "roles": ["viewer"]} | claims
        return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})

    def status(impl, bearer: str) -> int:
        impl.reconfigure(CATALOG)
        return TestClient(create_app(ROUTERS, impl)).get(
            "/v1/models", headers={"Authorization": f"Bearer {bearer}"}).status_code

    monkeypatch.setenv("RAYLAB_UNIT_STATIC_KEYS", "sk-static,sk.shaped.like-a-jwt")
    with_oidc = Ingress(generator=None, args=args)
    now = int(time.time())
    assert status(with_oidc, token()) == 200 and status(with_oidc, "sk-static") == 200
    assert status(with_oidc, "sk.shaped.like-a-jwt") == 200  # a static key with two dots is not taken for a JWT
    assert status(with_oidc, token(exp=now - 3600, iat=now - 7200)) == 401
    assert status(with_oidc, token(key=stranger)) == 401
    assert status(with_oidc, token(roles=["offline_access"])) == 403  # a valid token naming no raylab role
    without = Ingress(generator=None, args={"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_STATIC_KEYS"})
    assert status(without, token()) == 401  # the control: the token counts only with serve.oidc
    refused = [e["fields"].get("credential") for e in audit.entries(audit.Settings.from_env(), audit.Filter(kinds=("access",)))
               if e["kind"] == "access.deny"]
    assert refused.count("oidc") == 2  # the expired and the foreign-signed token

    # serve.oidc without an issuer to verify against is the user's error, naming both keys
    with pytest.raises(config.ConfigError, match="serve.oidc.*governance.oidc"):
        config.load_dict(raw | {"governance": {}})
