"""`${env:NAME}` secret references: found, checked and expanded at the point of use.

    expand_env("postgresql://u:${env:PGPASS}@db/x", "data.sources.0.url")
    env_refs(cfg.model_dump(mode="json"))        # [("data.sources.0.url", "PGPASS"), ...]

A config keeps the reference, never the value, in every file raylab writes (the resolved
config, best.yaml), so written configs stay re-runnable and hold no secret. The config
package checks the form at load time; stages expand a value only where they use it.
"""

from __future__ import annotations

import os
import re
from typing import Any

from raylab.errors import UserError

ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def malformed_refs(raw: Any, path: str = "") -> list[str]:
    """`${env:NAME}` is the only reference form; catch `${ENV:x}`, `${env:}` and friends."""
    if isinstance(raw, dict):
        return [p for k, v in raw.items() for p in malformed_refs(v, f"{path}{k}.")]
    if isinstance(raw, list):
        return [p for i, v in enumerate(raw) for p in malformed_refs(v, f"{path}{i}.")]
    if isinstance(raw, str) and "${" in raw and ENV_REF.sub("", raw).count("${"):
        return [f"{path.rstrip('.')}: malformed reference in {raw!r}; expected ${{env:NAME}}"]
    return []


def env_refs(mapping: Any, path: str = "") -> list[tuple[str, str]]:
    """(key path, variable) for every `${env:NAME}` reference in a plain mapping."""
    if isinstance(mapping, dict):
        return [r for k, v in mapping.items() for r in env_refs(v, f"{path}{k}.")]
    if isinstance(mapping, list):
        return [r for i, v in enumerate(mapping) for r in env_refs(v, f"{path}{i}.")]
    if isinstance(mapping, str):
        return [(path.rstrip("."), name) for name in ENV_REF.findall(mapping)]
    return []


def expand_env(value: str, key: str) -> str:
    """Replace `${env:NAME}` references at the point of use; `key` names the config key."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise UserError(f"{key} references ${{env:{name}}} but the environment variable {name} is not set")
        return os.environ[name]

    return ENV_REF.sub(sub, value)


# Query-string keys whose values are credentials; matched case-insensitively on the key with
# `-` and `_` ignored, so `api-key`, `API_KEY` and `apikey` are one key.
SECRET_QUERY_KEYS = frozenset({
    "token", "accesstoken", "refreshtoken", "idtoken", "authtoken", "key", "apikey", "secret",
    "clientsecret", "password", "passwd", "pwd", "sig", "signature", "auth", "authorization",
    "credential", "credentials", "session", "sessionid", "xamzsignature", "xamzcredential",
    "xamzsecuritytoken", "xgoogsignature", "xgoogcredential",
})


def _secret_key(key: str) -> bool:
    k = key.lower().replace("-", "").replace("_", "")
    return k in SECRET_QUERY_KEYS or k.endswith(("token", "secret", "password", "apikey", "signature"))


def _redact_pairs(text: str) -> str:
    """`a=1&token=x` -> `a=1&token=***`, every other byte kept as written."""
    from urllib.parse import unquote_plus

    out = []
    for piece in text.split("&"):
        key, eq, value = piece.partition("=")
        if eq and value and _secret_key(unquote_plus(key)) and not ENV_REF.fullmatch(unquote_plus(value)):
            piece = f"{key}=***"
        out.append(piece)
    return "&".join(out)


def _secret_pairs(text: str) -> list[str]:
    from urllib.parse import unquote_plus

    out = []
    for piece in text.split("&"):
        key, eq, value = piece.partition("=")
        if eq and value and _secret_key(unquote_plus(key)) and not ENV_REF.fullmatch(unquote_plus(value)):
            out += [value, unquote_plus(value)]
    return out


def url_secrets(url: str) -> list[str]:
    """The secret values written in a URL (as written and decoded): what `redact_url` hides."""
    from urllib.parse import unquote, urlsplit

    if "://" not in url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url.split("://", 1)[1]]
    found = _secret_pairs(parts.query) + _secret_pairs(parts.fragment)
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    _, has_password, password = userinfo.partition(":")
    if has_password and password and not ENV_REF.fullmatch(password):
        found += [password, unquote(password)]
    return found


def env_values(value: str) -> list[str]:
    """What the `${env:NAME}` references in `value` expand to (the set ones)."""
    return [os.environ[name] for name in ENV_REF.findall(value) if os.environ.get(name)]


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with every secret value replaced by ***: for messages a library composed from
    a URL or credentials (an InvalidURL quoting the URL, say). Values under 4 characters
    are left alone: replacing them would garble the message and hide nothing of worth."""
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """A URL fit to print: a userinfo password and the values of secret-looking query (and
    fragment) keys become ***. `${env:NAME}` references are kept: they are names, not
    values, and tell the user which variable to fix. Every other character is kept as
    written (no re-encoding, no normalising)."""
    from urllib.parse import urlsplit

    if "://" not in url:
        return url
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # unparseable: hide everything after the scheme rather than guess
        return url.split("://", 1)[0] + "://***"
    scheme, rest = url.split("://", 1)
    rest, has_fragment, fragment = rest[len(netloc):].partition("#")
    path, has_query, query = rest.partition("?")
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, password = userinfo.partition(":")
        if has_password and not ENV_REF.fullmatch(password):
            netloc = f"{user}:***@{host}"
    return (f"{scheme}://{netloc}{path}{has_query}{_redact_pairs(query)}"
            f"{has_fragment}{_redact_pairs(fragment)}")


# Config keys whose names sound like credentials but whose values name where one lives.
NAMES_A_SECRET = {"platform.api_keys_secret"}  # a Kubernetes Secret's name (raylab render), not its content


def _credential_key(key: str, path: str = "") -> bool:
    # `auth` is a credential in a URL's query, but `ray.auth` is the authentication mode.
    return _secret_key(key) and key.lower() != "auth" and path not in NAMES_A_SECRET


def literal_secrets(raw: Any, path: str = "") -> tuple[list[str], list[str]]:
    """(problems, values) for the config values that hold a literal credential: a password in
    a URL (or a secret query parameter), any value under a credential-named key (a header
    such as Authorization or X-Api-Key), or a value the secret detectors recognise (cloud,
    GitHub, Slack, Stripe, OpenAI keys, JWTs, private keys). `${env:NAME}` is the way to
    write them; each problem names the key and never the value (`values` are for scrubbing
    other messages)."""
    if isinstance(raw, dict):
        found = [literal_secrets(v, f"{path}{k}.") for k, v in raw.items()]
    elif isinstance(raw, list):
        found = [literal_secrets(v, f"{path}{i}.") for i, v in enumerate(raw)]
    elif isinstance(raw, str):
        return _literal(raw, path.rstrip("."))
    else:
        return [], []
    return [p for ps, _ in found for p in ps], [v for _, vs in found for v in vs]


_FIX = "put the value in an environment variable and write ${env:NAME} in its place"


def _literal(value: str, key: str) -> tuple[list[str], list[str]]:
    from raylab.core import pii_rules

    in_url = url_secrets(value)
    if in_url:
        return [f"{key}: the URL holds a literal password or token; {_FIX} "
                f"(e.g. {redact_url(value).replace('***', '${env:NAME}')})"], in_url
    bare = ENV_REF.sub("", value).strip()
    last = key.rsplit(".", 1)[-1]
    if bare and _credential_key(last, key) and not ENV_REF.search(value):
        return [f"{key}: holds a literal credential; {_FIX}"], [value, bare]
    spans = pii_rules.find_secrets(bare, entropy=False)
    if spans:
        return [f"{key}: holds what looks like a secret (an access key, token or private key); {_FIX}"], \
            [bare[s:e] for s, e in spans]
    return [], []
