"""OIDC bearer tokens: a JWT signed by the configured issuer, verified with PyJWT against the
issuer's JWKS (fetched from `jwks_url`, or read from `jwks_file` on machines that cannot reach
the issuer), then mapped to a Principal through two claims.

    v = Verifier.from_section(cfg.governance.oidc)   # issuer, audience, jwks_url|jwks_file, claims
    principal = v.principal(token)                   # or raises TokenRefused (expired, wrong
                                                     # audience or issuer, bad signature, no kid)

The signature, `exp`, `iss` and `aud` are checked by PyJWT (`exp`, `iss`, `aud` and `sub` are
required claims); only the algorithms configured are accepted, so a token cannot pick
`none` or an HMAC algorithm keyed with the public key. `role_claim` may be a dotted path
(Keycloak: `realm_access.roles`) holding a string or a list; roles raylab does not know are
ignored, and a token with none is authenticated but allowed nothing (deny by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from raylab.core.access.policy import ROLES, Principal


class TokenRefused(Exception):
    """A token that does not verify; the message says why (for the audit log)."""


@dataclass(frozen=True)
class Verifier:
    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: str | None = None
    role_claim: str = "roles"
    org_claim: str = "org"
    subject_claim: str = "sub"
    algorithms: tuple[str, ...] = ("RS256",)
    leeway_s: float = 30.0

    @classmethod
    def from_section(cls, section) -> Verifier:
        """From `governance.oidc` (raylab/config/governance.py: OidcConfig)."""
        return cls(issuer=section.issuer, audience=section.audience, jwks_url=section.jwks_url,
                   jwks_file=section.jwks_file, role_claim=section.role_claim, org_claim=section.org_claim,
                   subject_claim=section.subject_claim, algorithms=tuple(section.algorithms), leeway_s=section.leeway_s)

    def signing_key(self, token: str):
        """The issuer's public key that signed `token` (by its `kid`)."""
        import jwt

        try:
            if self.jwks_url:
                return _url_key(self.jwks_url, jwt.get_unverified_header(token).get("kid"))
            from raylab.core import storage

            header = jwt.get_unverified_header(token)
            keyset = jwt.PyJWKSet.from_json(storage.read_text(self.jwks_file))
            kid = header.get("kid")
            for k in keyset.keys:
                if kid is None or k.key_id == kid:
                    return k.key
            raise TokenRefused(f"no key {kid!r} in the issuer's JWKS")
        except jwt.PyJWTError as e:
            raise TokenRefused(f"signing key: {e}") from None

    def claims(self, token: str) -> dict:
        """The verified claims, or TokenRefused."""
        import jwt

        key = self.signing_key(token)
        try:
            return jwt.decode(token, key, algorithms=list(self.algorithms), audience=self.audience,
                              issuer=self.issuer, leeway=self.leeway_s,
                              options={"require": ["exp", "iss", "aud", self.subject_claim]})
        except jwt.PyJWTError as e:
            raise TokenRefused(f"{type(e).__name__}: {e}") from None

    def principal(self, token: str) -> Principal:
        claims = self.claims(token)
        org = _claim(claims, self.org_claim)
        if not isinstance(org, str) or not org:
            raise TokenRefused(f"the token has no {self.org_claim!r} claim naming an organisation")
        raw = _claim(claims, self.role_claim)
        roles = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else []
        return Principal(str(claims[self.subject_claim]), org, frozenset(r for r in roles if r in ROLES), "oidc")


def _claim(claims: dict, path: str):
    value = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


_clients: dict[str, object] = {}
_refetched: dict[str, float] = {}  # url -> when the key set was last fetched for an unknown kid
REFETCH_S = 60.0


def _client(url: str):
    # One client per URL: PyJWKClient caches the key set (5 minutes).
    import jwt

    if url not in _clients:
        _clients[url] = jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=10)
    return _clients[url]


def _url_key(url: str, kid: str | None):
    """The key `kid` from the issuer's key set at `url`. An unknown kid fetches the set again
    (the issuer rotated its keys), at most once per REFETCH_S per URL: otherwise tokens with
    made-up kids would have every request wait on the issuer."""
    import time

    client = _client(url)
    for refresh in (False, True):
        found = next((k.key for k in client.get_signing_keys(refresh=refresh) if kid is None or k.key_id == kid), None)
        if found is not None:
            return found
        if refresh or time.monotonic() - _refetched.get(url, float("-inf")) < REFETCH_S:
            break
        _refetched[url] = time.monotonic()
    raise TokenRefused(f"no key {kid!r} in the issuer's JWKS (fetched again at most every {REFETCH_S:.0f} s)")
