"""Who may do what: roles, actions, organisation scoping and separation of duties, decided by
one pure function over a small table (no I/O here; `raylab.core.access.authorize` adds the
audit entry).

    d = decide(Principal("ada", "acme", frozenset({"viewer"}), "api-key"), "jobs.create")
    d.allowed, d.status, d.reason        # False, 403, "role(s) viewer may not jobs.create"

Why a table in code rather than pycasbin: six roles, a fixed action list and two rules that
are not role grants (organisation scoping, and the creator of a version may not promote it)
fit in one screen that a reviewer reads whole and a test walks exhaustively; casbin would add a
model file, a policy store (its SQLAlchemy adapter, a second writer to the control-plane
database) and a matcher language, and the two special rules would still be code beside it.
The table is the policy; changing it is a reviewed code change, which is what an auditor
asks of an access policy anyway.

Rules, in the order `decide` applies them (deny by default: anything not granted is refused):
1. no principal, or an action not in ACTIONS -> deny (401 / 403);
2. a resource of another organisation -> deny with status 404, so a caller answers exactly
   as for a resource that does not exist and one org learns nothing about another's;
3. none of the principal's roles grants the action -> deny (403);
4. `models.promote` / `models.rollback` of a version whose creator is the principal -> deny
   (403, separation of duties: an approver who did not create it must promote it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("viewer", "data_steward", "ml_engineer", "approver", "auditor", "admin")

# Every action a caller can ask about. A name not here is denied (and is a caller's bug).
ACTIONS = (
    "files.read", "files.create", "files.delete",
    "jobs.read", "jobs.create", "jobs.cancel",
    "models.read", "models.evaluate", "models.promote", "models.rollback",
    "data.erase", "lineage.read", "audit.read",
    "serve.infer", "serve.deploy", "serve.load",
    "keys.create", "keys.list", "keys.revoke",
)

_READ = frozenset({"files.read", "jobs.read", "models.read", "serve.infer"})
# role -> the actions it grants. Roles do not inherit from each other implicitly: what each
# holds is spelled out, so reading one row answers "what can an X do".
GRANTS: dict[str, frozenset[str]] = {
    "viewer": _READ,
    "data_steward": _READ | {"files.create", "files.delete", "data.erase", "lineage.read"},
    "ml_engineer": _READ | {"files.create", "jobs.create", "jobs.cancel", "models.evaluate"},
    # Promotion is the approval: only an approver moves production, and never for a version
    # it created (rule 4). Rollback is a production move too.
    "approver": _READ | {"models.promote", "models.rollback", "lineage.read"},
    "auditor": _READ | {"audit.read", "lineage.read"},
    # The admin runs the platform (identities, deployments) but is not an approver: an
    # admin who must promote holds an approver key as well, so every promotion names one.
    "admin": _READ | {"files.create", "files.delete", "jobs.create", "jobs.cancel", "models.evaluate",
                      "audit.read", "lineage.read", "serve.deploy", "serve.load",
                      "keys.create", "keys.list", "keys.revoke"},
}
SEPARATED = frozenset({"models.promote", "models.rollback"})  # the creator may not


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: `subject` (an API key's name, an OIDC token's subject) in
    `org`, holding `roles`; `kind` is how it authenticated (api-key, oidc, static-key)."""

    subject: str
    org: str
    roles: frozenset[str]
    kind: str
    key_id: str | None = None

    @property
    def actor(self) -> str:
        return self.subject


@dataclass(frozen=True)
class Resource:
    """What an action is on: its `kind` (file, job, model, ...), `id`, owning `org` (None: a
    resource of the whole deployment, such as the audit log) and `owner` (who created it)."""

    kind: str
    id: str | None = None
    org: str | None = None
    owner: str | None = None


@dataclass(frozen=True)
class Decision:
    """The answer: `allowed`, the HTTP status a router answers when not (401, 403 or 404),
    and why (for the audit log and the error message)."""

    allowed: bool
    status: int
    reason: str
    action: str
    rule: str = field(default="grant")


def decide(principal: Principal | None, action: str, resource: Resource | None = None) -> Decision:
    """The decision for `principal` doing `action` on `resource` (see the module docstring)."""
    if principal is None:
        return Decision(False, 401, "not authenticated", action, "authenticate")
    if action not in ACTIONS:
        return Decision(False, 403, f"unknown action {action!r} (deny by default)", action, "unknown-action")
    if resource is not None and resource.org is not None and resource.org != principal.org:
        # 404, not 403: "exists but not yours" would tell org A what org B has.
        return Decision(False, 404, f"{resource.kind} not found in org {principal.org!r}", action, "org-scope")
    known = sorted(r for r in principal.roles if r in GRANTS)
    if not any(action in GRANTS[r] for r in known):
        held = ", ".join(known) or "no known role"
        return Decision(False, 403, f"role(s) {held} may not {action}", action, "role")
    if action in SEPARATED and resource is not None and resource.owner and resource.owner == principal.subject:
        return Decision(False, 403, f"{principal.subject} created {resource.kind} {resource.id}: separation of duties "
                        "needs an approver who did not create it", action, "separation-of-duties")
    return Decision(True, 200, f"granted to {', '.join(r for r in known if action in GRANTS[r])}", action)
