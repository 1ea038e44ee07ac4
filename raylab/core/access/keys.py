"""API keys in the control-plane database: created once (the key is shown then and never
again), stored as a digest, listed, revoked.

    key, row = create(db_url, org="acme", role="ml_engineer", name="ada", by="root@host")
    principal = lookup(db_url, key)      # a Principal, or None (unknown, wrong or revoked)
    revoke(db_url, row["key_id"], by="root@host")

A key is `rlk_<key_id>_<secret>`: `key_id` (12 hex characters) is public and indexes the row;
`secret` is 32 random bytes (secrets.token_urlsafe). The row keeps sha256 of the whole key.
Why a plain sha256 and not a password hash (bcrypt, argon2): those are slow on purpose to
stretch low-entropy passwords; a 256-bit random secret cannot be guessed however fast the
hash is, so a fast hash loses nothing and keeps every authenticated request cheap. Why no
server-side pepper (HMAC with a secret): it would only help for guessable keys, and would be
one more secret to distribute to every replica. The digest is compared with
hmac.compare_digest, so the time taken says nothing about how much of a key matched.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets

import sqlalchemy as sa

from raylab.core import controldb
from raylab.core.access.policy import ROLES, Principal
from raylab.errors import UserError

PREFIX = "rlk_"
KEY = re.compile(r"^rlk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")

metadata = sa.MetaData()
# Mirrors migrations/versions/0003_api_keys.py (the schema's source of truth).
api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("org", sa.String(255), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("created", sa.String(40), nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("revoked", sa.String(40)),
    sa.Column("revoked_by", sa.String(255)),
)
SHOWN = ("key_id", "name", "org", "role", "created", "created_by", "revoked", "revoked_by")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def check_identity(org: str, role: str, name: str | None) -> None:
    """A UserError naming the flag when --org, --role or --name is not acceptable."""
    if role not in ROLES:
        raise UserError(f"--role {role!r}: expected one of {', '.join(ROLES)}")
    if not NAME.match(org or ""):
        raise UserError(f"--org {org!r}: expected letters, digits and . _ @ + - (at most 128, not starting with a sign)")
    if name is not None and not NAME.match(name):
        raise UserError(f"--name {name!r}: expected letters, digits and . _ @ + - (at most 128, not starting with a sign)")


def create(db_url: str, org: str, role: str, name: str | None, by: str) -> tuple[str, dict]:
    """A new key for `name` (default: the key's id) in `org` with `role`: (the key, its row).
    The key itself is returned here only; the database keeps its digest."""
    check_identity(org, role, name)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    key = f"{PREFIX}{key_id}_{secret}"
    row = {"key_id": key_id, "digest": digest(key), "name": name or f"key-{key_id}", "org": org, "role": role,
           "created": _now(), "created_by": by, "revoked": None, "revoked_by": None}
    with controldb.write_transaction(controldb.engine(db_url), "raylab.api_keys") as conn:
        conn.execute(sa.insert(api_keys).values(**row))
    return key, {k: row[k] for k in SHOWN}


def listing(db_url: str, org: str | None = None, include_revoked: bool = False) -> list[dict]:
    """The keys (never their digests), oldest first; only `org`'s when given."""
    query = sa.select(*(api_keys.c[k] for k in SHOWN)).order_by(api_keys.c.created, api_keys.c.key_id)
    if org:
        query = query.where(api_keys.c.org == org)
    if not include_revoked:
        query = query.where(api_keys.c.revoked.is_(None))
    with controldb.engine(db_url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def revoke(db_url: str, key_id: str, by: str) -> dict:
    """Mark `key_id` (or a whole key, whose id is taken from it) revoked from now on."""
    m = KEY.match(key_id.strip())
    key_id = m.group(1) if m else key_id.strip()
    with controldb.write_transaction(controldb.engine(db_url), "raylab.api_keys") as conn:
        row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        if row is None:
            raise UserError(f"KEY_ID {key_id!r}: no such API key (`raylab keys list` shows the ids)")
        if row.revoked is None:
            conn.execute(sa.update(api_keys).where(api_keys.c.key_id == key_id).values(revoked=_now(), revoked_by=by))
        out = conn.execute(sa.select(*(api_keys.c[k] for k in SHOWN)).where(api_keys.c.key_id == key_id)).first()
    return dict(out._mapping)


def lookup(db_url: str, key: str) -> tuple[Principal | None, str]:
    """The principal a presented key stands for, or None with the reason (malformed, unknown,
    wrong secret, revoked): the reason goes to the audit log, never to the caller."""
    m = KEY.match(key.strip())
    if not m:
        return None, "not a raylab API key"
    with controldb.engine(db_url).connect() as conn:
        row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == m.group(1))).first()
    given = digest(key.strip()).encode()
    # Compared even when the id is unknown, so an unknown id costs the same as a wrong secret.
    matches = hmac.compare_digest(given, (row.digest if row is not None else "0" * 64).encode())
    if row is None:
        return None, f"unknown key id {m.group(1)}"
    if not matches:
        return None, f"wrong secret for key id {row.key_id}"
    if row.revoked is not None:
        return None, f"key id {row.key_id} was revoked at {row.revoked}"
    return Principal(row.name, row.org, frozenset({row.role}), "api-key", row.key_id), f"key id {row.key_id}"
