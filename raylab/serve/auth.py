"""Static API keys for the endpoint: `serve.api_keys_env` (the name of a variable holding
comma-separated keys) and `serve.api_keys_file` (a local path or URI; one key per line, `#`
starts a comment line, blank lines are skipped). No keys configured means no authentication:
the config refuses that on a non-loopback `serve.host` unless `serve.allow_unauthenticated`.

    keys = api_keys({"api_keys_env": "RAYLAB_API_KEYS", "api_keys_file": None})
    authorized(request.headers.get("authorization", ""), keys)

With `serve.api_keys_db: true` the endpoint also accepts the keys `raylab keys create` made
(rlk_..., looked up in the control-plane database, each with its role and organisation;
revoked keys are refused from the next request):

    principal = authenticate(header, keys, database)   # a core.access.Principal, or None

With `serve.oidc: true` it also accepts OIDC bearer tokens (JWTs) verified against
governance.oidc's issuer (core/access/oidc.py), each with its role and organisation:

    principal = authenticate(header, keys, database, verifier)

Keys that are configured but yield none (an unset variable, a missing, empty or all-comment
file) are a UserError naming the variable or file: `raylab serve` calls `api_keys` before it
deploys anything, so that is exit 2, not a replica that fails to start.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from raylab.core import access, storage
from raylab.errors import UserError


def api_keys(args: dict) -> set[str]:
    """The keys `args` (the Serve application's args, or the serve section's two keys) name."""
    env, path = args.get("api_keys_env"), args.get("api_keys_file")
    keys: set[str] = set()
    if env:
        from_env = {k.strip() for k in os.environ.get(env, "").split(",") if k.strip()}
        if not from_env:
            raise UserError(f"serve.api_keys_env: ${env} is not set (or holds no key); "
                            "set it to comma-separated API keys")
        keys |= from_env
    if path:
        keys |= _keys_in_file(path)
    return keys


def _keys_in_file(path: str) -> set[str]:
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise UserError(f"serve.api_keys_file: {path} not found; create it with one API key per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"serve.api_keys_file: cannot read {path}: {e}") from None
    # Stripped before the comment test, so an indented `# note` is a comment, not a key.
    keys = {line.strip() for line in text.splitlines()}
    keys = {k for k in keys if k and not k.startswith("#")}
    if not keys:
        raise UserError(f"serve.api_keys_file: {path} has no API key (only blank or # comment lines); "
                        "put one key per line")
    return keys


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps a key's length out of the timing as well, and
    # bytes keep compare_digest working for non-ASCII input (it rejects non-ASCII str).
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def authorized(header: str, keys: set[str]) -> bool:
    """Whether an `Authorization` header value carries one of `keys` as a Bearer token. Every
    key is compared, each in constant time, so the time taken says nothing about which key
    (or how much of one) matched."""
    scheme, _, token = header.strip().partition(" ")
    given = _digest(token.strip())
    matches = [hmac.compare_digest(given, _digest(k)) for k in keys]  # no short-circuit
    return scheme.lower() == "bearer" and bool(token.strip()) and any(matches)


STATIC = access.Principal("static-key", "", frozenset({"viewer"}), "static-key")  # who a static key is


def authenticate(header: str, keys: set[str], database: str | None, verifier=None) -> access.Principal | None:
    """Who an `Authorization` header stands for: a raylab API key from the control-plane
    database at `database` (when the endpoint accepts them) with its role and org, else a JWT
    `verifier` (an oidc.Verifier) accepts, else one of the static `keys` (STATIC: serve.infer,
    in no organisation), else None. A refused raylab key or token is recorded in the audit log
    (access.deny) by core.access."""
    token = header.strip().partition(" ")[2].strip()
    if database and token.startswith("rlk_"):
        return access.authenticate(header, database)
    if verifier is not None and token.count(".") == 2 and not (keys and authorized(header, keys)):
        return access.authenticate(header, None, verifier)
    return STATIC if keys and authorized(header, keys) else None
