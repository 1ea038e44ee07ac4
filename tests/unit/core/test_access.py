"""Identities and roles (raylab/core/access/): the policy table (deny by default, org scoping
answered as 404, separation of duties), API keys on a real SQLite control-plane database
(hashed at rest, revoked keys refused), OIDC tokens signed with a key pair made here and
verified against a JWKS served over loopback HTTP or read from a file (expired, wrong
audience, wrongly signed refused), `raylab keys` from the CLI, and each decision read back
from the audit log.

    pytest tests/unit/core/test_access.py
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from raylab import cli
from raylab.core import access, audit
from raylab.core.access import keys, oidc
from raylab.core.access.policy import ACTIONS, GRANTS, ROLES, Principal, Resource, decide

ISSUER, AUDIENCE = "https://login.acme.example/realms/acme", "raylab"
FETCHES: list[str] = []  # the loopback JWKS server's requests


@pytest.fixture
def db(tmp_path, monkeypatch):
    """A fresh SQLite control-plane database with this test's own home, audit key and user."""
    from raylab.core import controldb

    url = f"sqlite:///{tmp_path / 'control.db'}"
    monkeypatch.setenv("RAYLAB_DATABASE_URL", url)
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    monkeypatch.setenv("RAYLAB_AUDIT_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("RAYLAB_USER", "root")
    monkeypatch.delenv("RAYLAB_AUDIT", raising=False)
    yield url
    controldb.dispose_all()


def who(role: str, org: str = "acme", subject: str = "ada") -> Principal:
    return Principal(subject, org, frozenset({role}), "api-key")


def access_entries() -> list[dict]:
    return list(audit.entries(audit.Settings.from_env(), audit.Filter(kinds=("access",))))


# --- the policy table ---------------------------------------------------------------------

def test_every_role_is_granted_exactly_its_row_and_nothing_else():
    granted = {r: {a for a in ACTIONS if decide(who(r), a).allowed} for r in ROLES}
    assert granted == {r: set(GRANTS[r]) for r in ROLES}
    assert all(GRANTS[r] <= set(ACTIONS) for r in ROLES)  # no grant names an action callers cannot ask
    # The rows differ where the issue says they must (each is a negative control for the others).
    assert "jobs.create" in GRANTS["ml_engineer"] and "models.promote" in GRANTS["approver"]


def test_deny_by_default():
    assert decide(None, "models.read").status == 401
    unknown = decide(who("admin"), "models.delete_everything")
    assert not unknown.allowed and unknown.status == 403 and unknown.rule == "unknown-action"
    nobody = Principal("ada", "acme", frozenset({"superuser"}), "oidc")  # a role raylab does not know
    assert not decide(nobody, "models.read").allowed
    assert decide(who("viewer"), "models.read").allowed  # the control: a known role is granted


def test_a_viewer_cannot_create_jobs_and_an_ml_engineer_cannot_promote():
    job = Resource("job", org="acme")
    d = decide(who("viewer"), "jobs.create", job)
    assert (d.allowed, d.status, d.rule) == (False, 403, "role") and "viewer may not jobs.create" in d.reason
    assert decide(who("ml_engineer"), "jobs.create", job).allowed
    version = Resource("model", "widgets/3", "acme", owner="bob")
    d = decide(who("ml_engineer"), "models.promote", version)
    assert (d.allowed, d.status, d.rule) == (False, 403, "role")
    assert decide(who("approver"), "models.promote", version).allowed
    assert not decide(who("admin"), "models.promote", version).allowed  # an admin is not an approver


def test_the_creator_of_a_version_cannot_promote_it_another_approver_can():
    version = Resource("model", "widgets/3", "acme", owner="ada")
    own = decide(who("approver", subject="ada"), "models.promote", version)
    assert (own.allowed, own.status, own.rule) == (False, 403, "separation-of-duties")
    assert not decide(who("approver", subject="ada"), "models.rollback", version).allowed
    assert decide(who("approver", subject="carol"), "models.promote", version).allowed


def test_another_orgs_resource_is_not_found_rather_than_forbidden():
    theirs, ours = Resource("file", "file-1", org="globex"), Resource("file", "file-1", org="acme")
    d = decide(who("admin"), "files.read", theirs)
    assert (d.allowed, d.status, d.rule) == (False, 404, "org-scope") and "globex" not in d.reason
    assert decide(who("admin"), "files.read", ours).allowed
    # Scoping comes before roles: a role that may not read still learns nothing about globex.
    assert decide(who("approver"), "files.delete", theirs).status == 404


# --- API keys -----------------------------------------------------------------------------

def test_keys_are_stored_hashed_looked_up_and_refused_once_revoked(db):
    key, row = keys.create(db, "acme", "ml_engineer", "ada", by="root@host")
    assert key.startswith(f"rlk_{row['key_id']}_") and row["name"] == "ada"
    principal, _ = keys.lookup(db, key)
    assert principal == Principal("ada", "acme", frozenset({"ml_engineer"}), "api-key", row["key_id"])

    stored = sqlite3.connect(db.removeprefix("sqlite:///")).execute("select * from api_keys").fetchall()
    assert len(stored) == 1 and key not in json.dumps(stored) and keys.digest(key) in stored[0]
    secret = key[len("rlk_") + 13:]  # after rlk_<12 hex>_ (the secret's alphabet has _ too)
    assert len(secret) == 43
    assert all(secret not in str(col) for col in stored[0])

    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert keys.lookup(db, wrong) == (None, f"wrong secret for key id {row['key_id']}")
    assert keys.lookup(db, "rlk_000000000000_" + secret) == (None, "unknown key id 000000000000")
    assert keys.lookup(db, "sk-not-ours") == (None, "not a raylab API key")

    keys.revoke(db, row["key_id"], by="root@host")
    principal, why = keys.lookup(db, key)
    assert principal is None and "revoked" in why
    assert keys.listing(db) == [] and keys.listing(db, include_revoked=True)[0]["revoked_by"] == "root@host"


def test_keys_cli_prints_the_key_once_lists_and_revokes(db, capsys):
    assert cli.main(["keys", "create", "--org", "acme", "--role", "approver", "--name", "carol"]) == 0
    out = capsys.readouterr().out  # the first use of the audit log also says it made its signing key
    assert out.count("rlk_") == 1, out
    key = out.strip().splitlines()[-1]
    assert access.authenticate(f"Bearer {key}", db).subject == "carol"
    assert cli.main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ["carol"] and key not in json.dumps(listed)
    assert cli.main(["keys", "revoke", listed[0]["key_id"]]) == 0
    assert access.authenticate(f"Bearer {key}", db) is None
    for argv, flag in ((["keys", "create", "--org", "a b", "--role", "viewer"], "--org"),
                       (["keys", "revoke", "ffffffffffff"], "KEY_ID")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err
    kinds = [e["kind"] for e in access_entries()]
    assert kinds[:2] == ["access.key_create", "access.key_revoke"] and kinds[-1] == "access.deny"


# --- OIDC ---------------------------------------------------------------------------------

def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks(private, kid: str) -> dict:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return {"keys": [public | {"kid": kid, "use": "sig", "alg": "RS256"}]}


def token(private, kid: str = "k1", **claims) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "dana", "org": "acme", "iat": now, "exp": now + 600,
            "realm_access": {"roles": ["ml_engineer", "offline_access"]}} | claims
    return jwt.encode(body, private, algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def issuer_key():
    return rsa_key()


@pytest.fixture
def jwks_server(issuer_key, monkeypatch):
    """The issuer's JWKS served over loopback HTTP, as an identity provider serves it."""
    body = json.dumps(jwks(issuer_key, "k1")).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            FETCHES.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/certs"
    server.shutdown()
    server.server_close()


def test_oidc_tokens_verify_against_the_served_jwks_and_bad_ones_are_refused(issuer_key, jwks_server):
    v = oidc.Verifier(ISSUER, AUDIENCE, jwks_url=jwks_server, role_claim="realm_access.roles")
    p = v.principal(token(issuer_key))
    assert p == Principal("dana", "acme", frozenset({"ml_engineer"}), "oidc")  # offline_access ignored
    now = int(time.time())
    bad = {
        "expired": token(issuer_key, exp=now - 3600, iat=now - 7200),
        "wrong audience": token(issuer_key, aud="someone-else"),
        "wrong issuer": token(issuer_key, iss="https://evil.example"),
        "signed by another key": token(rsa_key()),
        "unknown kid": token(rsa_key(), kid="k2"),
        "alg none": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "org": "acme", "exp": now + 600},
                               None, algorithm="none", headers={"kid": "k1"}),
        "no org": token(issuer_key, org=None),
    }
    for case, t in bad.items():
        with pytest.raises(oidc.TokenRefused):
            v.principal(t)
            pytest.fail(case)
    with pytest.raises(oidc.TokenRefused, match="ExpiredSignature"):
        v.principal(bad["expired"])
    with pytest.raises(oidc.TokenRefused, match="InvalidAudience"):
        v.principal(bad["wrong audience"])


def test_unknown_key_ids_fetch_the_jwks_again_at_most_once_a_minute(issuer_key, jwks_server, monkeypatch):
    """Tokens with made-up kids must not make every request wait on the issuer: the first
    unknown kid fetches the key set again, the next ones within REFETCH_S do not. The control:
    once REFETCH_S has passed, an unknown kid fetches again (a rotation is still picked up)."""
    monkeypatch.setattr(oidc, "_clients", {})
    monkeypatch.setattr(oidc, "_refetched", {})
    FETCHES.clear()
    v = oidc.Verifier(ISSUER, AUDIENCE, jwks_url=jwks_server, role_claim="realm_access.roles")
    assert v.principal(token(issuer_key)).subject == "dana" and len(FETCHES) == 1
    for i in range(5):
        with pytest.raises(oidc.TokenRefused, match=f"no key 'made-up-{i}'"):
            v.principal(token(rsa_key(), kid=f"made-up-{i}"))
    assert len(FETCHES) == 2  # the first unknown kid fetched again; the other four did not
    monkeypatch.setattr(oidc, "_refetched", {jwks_server: time.monotonic() - oidc.REFETCH_S - 1})
    with pytest.raises(oidc.TokenRefused):
        v.principal(token(rsa_key(), kid="made-up-later"))
    assert len(FETCHES) == 3


def test_oidc_from_a_jwks_file_and_its_config_section(issuer_key, tmp_path):
    from raylab.config.governance import OidcConfig

    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(issuer_key, "k1")))
    section = OidcConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=str(path), role_claim="realm_access.roles")
    v = oidc.Verifier.from_section(section)
    assert v.principal(token(issuer_key)).roles == {"ml_engineer"}
    with pytest.raises(oidc.TokenRefused, match="Signature"):
        v.principal(token(rsa_key()))
    with pytest.raises(ValueError, match="exactly one of jwks_url"):
        OidcConfig(issuer=ISSUER, audience=AUDIENCE)


# --- the audit log ------------------------------------------------------------------------

def test_each_decision_and_refusal_is_in_the_audit_log(db, issuer_key, tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(issuer_key, "k1")))
    verifier = oidc.Verifier(ISSUER, AUDIENCE, jwks_file=str(path), role_claim="realm_access.roles")
    key, row = keys.create(db, "acme", "viewer", "bob", by="root@host")
    bob = access.authenticate(f"Bearer {key}", db, verifier)
    dana = access.authenticate(f"Bearer {token(issuer_key)}", db, verifier)
    assert bob.subject == "bob" and dana.subject == "dana"
    assert access.authenticate(f"Bearer {token(issuer_key, exp=1, iat=0)}", db, verifier) is None
    access.authorize(bob, "jobs.create", access.Resource("job", org="acme"))
    access.authorize(dana, "jobs.create", access.Resource("job", org="acme"))
    access.authorize(dana, "files.read", access.Resource("file", "file-9", org="globex"))
    with pytest.raises(access.Denied, match="separation of duties") as refused:
        access.require(access.Principal("dana", "acme", frozenset({"approver"}), "oidc"), "models.promote",
                       access.Resource("model", "widgets/2", "acme", owner="dana"))
    assert refused.value.decision.status == 403
    assert access.authorize(dana, "jobs.read", record_allow=False).allowed  # allowed, not recorded

    got = [(e["kind"], e["actor"], e["actor_kind"], e["fields"].get("action"), e["fields"].get("status"))
           for e in access_entries()]
    assert got == [
        ("access.deny", "anonymous", "anonymous", "authenticate", 401),   # the expired token
        ("access.deny", "bob", "api-key", "jobs.create", 403),
        ("access.allow", "dana", "oidc", "jobs.create", 200),
        ("access.deny", "dana", "oidc", "files.read", 404),
        ("access.deny", "dana", "oidc", "models.promote", 403),
    ]
    entries = access_entries()
    assert "ExpiredSignature" in entries[0]["fields"]["reason"] and entries[1]["fields"]["key_id"] == row["key_id"]
    assert entries[4]["model"] == "widgets" and entries[4]["version"] == "2"
    assert audit.verify(audit.Settings.from_env()).ok
