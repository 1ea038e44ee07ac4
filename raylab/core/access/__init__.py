"""Identities, roles and separation of duties: who a caller is (an API key from the
control-plane database, an OIDC bearer token), what its role lets it do in its organisation,
and an audit entry for every decision.

    from raylab.core import access
    principal = access.authenticate(request.headers.get("authorization", ""), db_url, verifier)
    d = access.authorize(principal, "jobs.create", access.Resource("job", org=principal.org))
    if not d.allowed: answer d.status (401, 403, or 404 for another org's resource) with d.reason
    access.require(principal, "models.promote", resource)     # or raises Denied (a UserError)

From the shell: `raylab keys create --org ORG --role ROLE [--name NAME]`, `raylab keys list`,
`raylab keys revoke KEY_ID` (raylab/cli/keys.py). Embedded single-user mode (the CLI on one's
own machine, no principal) records the OS user in the audit log and enforces nothing:
docs/governance.md says so.

Why in `core` (like `core/audit/`): the fine-tuning service's routers (serve), the inference
endpoint's authentication (serve/auth.py) and the registry's promote (registry/aliases.py) all
need the same decision, and core is the one package every one of them may import. It holds
no config import: the OIDC settings come in as `oidc.Verifier`.

Modules: policy (the roles table and `decide`, pure), keys (the api_keys table: create, list,
revoke, lookup), oidc (JWT verification against the issuer's JWKS). Every `authenticate` failure
and every `authorize` answer is one `core.events` event (access.deny / access.allow), so it is
in the hash-chained audit log with the identity as its actor.
"""

from __future__ import annotations

from raylab.core import events
from raylab.core.access.policy import ACTIONS, GRANTS, ROLES, Decision, Principal, Resource, decide
from raylab.errors import UserError

ANONYMOUS = ("anonymous", "anonymous")  # the audit identity of a caller that did not authenticate


class Denied(UserError):
    """An action refused by `require`: the CLI's exit 2 with the reason; a router answers
    `decision.status` (401, 403, or 404 for another organisation's resource)."""

    def __init__(self, decision: Decision):
        self.decision = decision
        super().__init__(f"{decision.action}: denied ({decision.reason})")


def authorize(principal: Principal | None, action: str, resource: Resource | None = None, *,
              run: str | None = None, record_allow: bool = True) -> Decision:
    """Decide (policy.decide) and record the decision in the audit log. `record_allow=False`
    records denials only: for per-request checks on a hot path (each inference request),
    where an audit entry per allowed request would make the audit log's single writer the
    endpoint's throughput limit; the identity's creation and every refusal stay recorded."""
    d = decide(principal, action, resource)
    if d.allowed and not record_allow:
        return d
    identity = (principal.actor, principal.kind) if principal else ANONYMOUS
    model, version = _model_version(resource)
    fields = {"action": action, "reason": d.reason, "rule": d.rule, "status": d.status}
    if principal is not None:
        fields |= {"org": principal.org, "roles": sorted(principal.roles)}
        if principal.key_id:
            fields["key_id"] = principal.key_id
    if resource is not None:
        fields |= {"resource": {"kind": resource.kind, "id": resource.id, "org": resource.org, "owner": resource.owner}}
    events.emit("access.allow" if d.allowed else "access.deny", run=run, model=model, version=version,
                identity=identity, **fields)
    return d


def require(principal: Principal | None, action: str, resource: Resource | None = None, *,
            run: str | None = None) -> Decision:
    """`authorize`, raising Denied when the answer is no."""
    d = authorize(principal, action, resource, run=run)
    if not d.allowed:
        raise Denied(d)
    return d


def authenticate(header: str, db_url: str | None, verifier=None) -> Principal | None:
    """The principal an `Authorization: Bearer ...` header stands for: a raylab API key
    (rlk_...) looked up in the control-plane database at `db_url`, else, with an OIDC
    `verifier`, a JWT. None when it stands for no one; that refusal and its reason (unknown,
    revoked, expired, badly signed) are recorded as access.deny."""
    from raylab.core.access import keys, oidc

    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return _refused("no bearer token", "none")
    if token.startswith(keys.PREFIX) and db_url:
        principal, why = keys.lookup(db_url, token)
        return principal or _refused(why, "api-key")
    if verifier is not None and token.count(".") == 2:
        try:
            return verifier.principal(token)
        except oidc.TokenRefused as e:
            return _refused(str(e), "oidc")
    return _refused("neither a raylab API key nor (with governance.oidc) a JWT", "unknown")


def _refused(reason: str, credential: str) -> None:
    events.emit("access.deny", identity=ANONYMOUS, action="authenticate", credential=credential,
                reason=reason[:300], rule="authenticate", status=401)
    return None


def _model_version(resource: Resource | None) -> tuple[str | None, str | None]:
    if resource is None or resource.kind != "model" or not resource.id:
        return None, None
    name, _, version = resource.id.partition("/")
    return name, version or None


def model_resource(name: str, version: int | str, tags: dict) -> Resource:
    """A registry version as a Resource: its org and creator from the tags `creator_tags`
    put on it at registration (a version registered without them belongs to no org)."""
    return Resource("model", f"{name}/{version}", tags.get(ORG_TAG) or None, tags.get(CREATOR_TAG) or None)


CREATOR_TAG, ORG_TAG = "raylab.created_by", "raylab.org"
ORG_ENV = "RAYLAB_ORG"  # the service sets it (with RAYLAB_USER) for the jobs it submits


def creator_tags() -> dict[str, str]:
    """Who registers a version, as tags (the separation-of-duties check reads them): the
    user (`$RAYLAB_USER`, else the OS login; the service sets it to the caller's subject) and
    `$RAYLAB_ORG` when set."""
    import os

    org = os.environ.get(ORG_ENV)
    return {CREATOR_TAG: events.user()} | ({ORG_TAG: org} if org else {})


__all__ = ["ACTIONS", "GRANTS", "ROLES", "Decision", "Denied", "Principal", "Resource", "authenticate", "authorize",
           "creator_tags", "decide", "model_resource", "require", "CREATOR_TAG", "ORG_TAG"]
