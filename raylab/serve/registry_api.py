"""The registry's production moves and the endpoint's deploys through the service, so the
caller's role, organisation and separation of duties hold for them (issue 26, item 3):

    POST /v1/registry/models/{name}/promote   {"version": 3, "reason": "...", "force": false}
    POST /v1/registry/models/{name}/rollback  {"reason": "..."}
    POST /v1/registry/deploy                  {"ref": "acme-assistant@production"}
    POST /v1/registry/load                    {"ref": "acme-assistant/3"}   (and /unload)

`raylab models promote|rollback` and `raylab deploy` call these when $RAYLAB_API_URL is set
(cli/apiclient.py). Promote and rollback need an approver who did not create the version
(registry/aliases.py checks it through core.access, audited); deploy needs `serve.deploy`
(admin) on the version, load and unload (serve/load.py) `serve.load` (admin). Deploying through the service matters because `raylab deploy` run
against the cluster itself only needs the Ray dashboard (and its token): it passes no role.

A model or version the caller cannot see is a 404 with the same message as one that does not
exist: the registry's own messages list the model's versions and aliases, so they reach the
caller only after access was granted.
"""

from __future__ import annotations

from raylab import registry
from raylab.core import access
from raylab.errors import UserError
from raylab.serve import openai_api as oa


class RegistryOps:
    """Promote, rollback and deploy for authenticated callers, on the service's registry."""

    def __init__(self, cfg, address: str | None):
        self.cfg, self.address = cfg, address
        self._store = None

    def store(self):
        if self._store is None:  # opening an MLflow store costs seconds: not at service start-up
            self._store = registry.open_store(self.cfg)
        return self._store

    def _version(self, principal, ref: str, action: str):
        """The version `ref` names, once `principal` may `action` it (else access.Denied)."""
        store = self.store()
        try:
            mv = registry.get_version(store, ref)
        except UserError:
            raise oa.ApiError(404, f"model {ref!r} not found", "model", "model_not_found") from None
        try:
            access.require(principal, action, access.model_resource(mv.name, mv.version, mv.tags),
                           run=registry.version_run(mv))
        except access.Denied as e:
            raise _refused(e, ref) from None
        return mv

    def promote(self, principal, name: str, version: str, force: bool, reason: str | None) -> dict:
        store = self.store()
        try:
            number = registry.version_number(store, name, version)
        except UserError:
            raise oa.ApiError(404, f"model {name + '/' + version!r} not found", "model", "model_not_found") from None
        self._version(principal, f"{name}/{number}", "models.read")  # no version details before this
        return _moves(name, f"{name}/{number}",
                      lambda: registry.promote(store, name, number, force, reason, principal=principal))

    def rollback(self, principal, name: str, reason: str | None) -> dict:
        # The production version stands for the model here: who may not read it learns nothing
        # (the registry's own "no previous version" message lists the aliases).
        self._version(principal, f"{name}@{registry.PRODUCTION}", "models.read")
        return _moves(name, f"{name}@{registry.PREVIOUS}",
                      lambda: registry.rollback(self.store(), name, reason, principal=principal))

    def deploy(self, principal, ref: str) -> dict:
        from raylab.serve.deploy import run_deploy

        mv = self._version(principal, ref, "serve.deploy")
        target = f"{mv.name}/{mv.version}"  # the version access was checked on, even if an alias moves meanwhile
        try:
            run_deploy(target, self.address, self.store().uri)
        except UserError as e:  # no endpoint deployed, a canary running: the caller's to resolve
            # a running canary's message names its candidate, which may be another org's
            message = ("a canary rollout is running on this endpoint; deploy again once it has decided"
                       if "canary" in str(e) else str(e))
            raise oa.ApiError(409, message, "ref", "deploy_refused") from None
        return {"object": "registry.deployment", "ref": ref, "model": target}

    def load(self, principal, ref: str, load: bool) -> dict:
        """Keep the version loaded on every replica of the running endpoint, or let go of it."""
        from raylab.serve.load import run_load

        mv = self._version(principal, ref, "serve.load")
        try:
            out = run_load(f"{mv.name}/{mv.version}", load, self.address, self.store().uri)
        except UserError as e:  # no endpoint, a plain-model endpoint, the limit, not loaded: the caller's
            raise oa.ApiError(409, str(e), "ref", "load_refused") from None
        return {"object": "registry.load", "ref": ref, **out}


def _moves(name: str, ref: str, move) -> dict:
    """The alias moves `move()` made, or its refusal as the caller's error (gates not passed,
    erasure pending, nothing to roll back to: 400; a denial: its own status)."""
    try:
        moves = move()
    except access.Denied as e:
        raise _refused(e, ref) from None
    except UserError as e:
        raise oa.ApiError(400, str(e), None, "registry_refused") from None
    return {"object": "registry.alias_moves", "model": name, "moves": moves}


def _refused(e: access.Denied, ref: str) -> oa.ApiError:
    """A denial as OpenAI's error: 401, 403 (the reason: role, separation of duties) or 404
    (another organisation's version, worded as one that does not exist)."""
    d = e.decision
    if d.status == 404:
        return oa.ApiError(404, f"model {ref!r} not found", "model", "model_not_found")
    return oa.ApiError(d.status, f"not allowed: {d.reason}", None, "permission_denied" if d.status == 403 else None)
