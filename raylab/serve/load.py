"""Operator load/unload of registry versions on the running endpoint (issue 26, item 2):
keep a version loaded on every Generator replica, ahead of its traffic and outside the
replicas' LRU, or let go of it.

    raylab deploy acme-assistant/3 --load      # through the service when $RAYLAB_API_URL is set
    raylab deploy acme-assistant/3 --unload
    curl -H "Authorization: Bearer $ADMIN_KEY" -d '{"ref": "acme-assistant/3"}' http://HOST/v1/registry/load

Like `raylab deploy`, a change of the Generator's `user_config` through Serve's REST API (its
`pinned` list, read by generator.GeneratorBase.reconfigure): no replica restarts, and
replicas started later load the list too. Routing is unchanged: every registered version is
servable by name; an unloaded one is loaded again on demand by the next request for it. The
list lives in the deployed application's config: `raylab deploy` keeps it, but a new
`raylab serve` (or redeploying an emitted config) starts without it. Through the service, a
version deleted from the registry cannot be named (404); unload it with the CLI on the
cluster, which accepts the NAME/N it was loaded as.
"""

from __future__ import annotations

import logging
import threading
import time

from raylab import registry
from raylab.core import events
from raylab.errors import UserError
from raylab.serve.deploy import (
    APP,
    dashboard_of,
    deployed,
    deployment,
    ingress_config,
    put_app,
    resolve,
    rest,
)

log = logging.getLogger(__name__)


_CHANGES = threading.Lock()  # one change at a time from this process (the service answers in threads)


def run_load(ref: str, load: bool = True, address: str | None = None, tracking_uri: str | None = None) -> dict:
    """Keep REF loaded on every Generator replica of the running endpoint (`load`), ahead of
    its traffic, or let go of it (`load=False`). Only versions of the model the endpoint
    serves; at most serve.max_adapters_per_replica loaded this way (besides the replicas' LRU);
    refused while a canary rollout runs (its controller rewrites the same config). Returns
    once Serve reports the application running with the change."""
    dashboard = dashboard_of(address)
    with _CHANGES:
        _, app = deployed(dashboard)
        if (app.get("args") or {}).get("tracking_uri") is None:
            raise UserError("this endpoint serves a plain model (no registry): there are no versions to load or unload")
        store = registry.open_store(tracking_uri=tracking_uri or app["args"]["tracking_uri"])
        pinned_before = list(_generator(app).get("user_config", {}).get("pinned", []))
        target = _loadable(store, ref) if load else _unloadable(store, ref, pinned_before)
        served = ingress_config(app).get("default", "").rsplit("/", 1)[0]
        if target.rsplit("/", 1)[0] != served:
            raise UserError(f"{target}: this endpoint serves {served}; only its versions can be loaded here")
        current, app = deployed(dashboard)  # read again just before changing it: resolve() may have taken a while
        if ingress_config(app).get("canary"):
            raise UserError("a canary rollout is running on this endpoint; load or unload versions once it has decided "
                            "(`raylab deploy --status`)")
        generator = _generator(app)
        conf = dict(generator.get("user_config") or {})
        pinned = list(conf.get("pinned", []))
        if load and target in pinned:
            return {"model": target, "loaded": True, "changed": False}
        if load:
            limit = app["args"]["limits"]["max_adapters_per_replica"]
            if len(pinned) >= limit:
                raise UserError(f"{len(pinned)} versions are loaded on this endpoint already, as many as "
                                f"serve.max_adapters_per_replica ({limit}) allows; unload one first")
            pinned.append(target)
        elif target in pinned:
            pinned.remove(target)
        else:
            raise UserError(f"{target} is not loaded on this endpoint by an operator; nothing to unload")
        generator["user_config"] = conf | {"pinned": pinned}
        before = ((current.get("applications") or {}).get(APP) or {}).get("last_deployed_time_s")
        put_app(dashboard, app, {}, current)
        name, version = target.rsplit("/", 1)
        # recorded once the change is applied, whatever the wait below finds
        events.emit("serve.load" if load else "serve.unload", model=name, version=int(version), ref=ref,
                    dashboard=dashboard, pinned=pinned)
        _wait_applied(dashboard, before)
        now = _generator(deployed(dashboard)[1]).get("user_config", {}).get("pinned", [])
        if (target in now) != load:
            raise UserError(f"the endpoint's loaded versions changed meanwhile (another deploy or load); {target} is "
                            f"{'not ' if load else ''}loaded now: run the command again")
    log.info(f"{'loaded' if load else 'unloaded'} {ref} ({target}) on every replica")
    return {"model": target, "loaded": load, "changed": True}


def _generator(app: dict) -> dict:
    return deployment(app, "Generator")


def _loadable(store, ref: str) -> str:
    """NAME/N of a version to load: its checksums verified here, before any replica loads it."""
    name, version, _ = resolve(store, ref)
    return f"{name}/{version}"


def _unloadable(store, ref: str, pinned: list[str]) -> str:
    """NAME/N of a version to unload; no artifact check (a tampered version must be unloadable)
    and a loaded version deleted from the registry since is named by its NAME/N as loaded."""
    if ref in pinned:
        return ref
    try:
        mv = registry.get_version(store, ref)
    except UserError:
        raise UserError(f"{ref} is not loaded on this endpoint by an operator; nothing to unload") from None
    return f"{mv.name}/{mv.version}"


def _wait_applied(dashboard: str, before: float | None, timeout_s: float = 300) -> None:
    """Until Serve has taken the new config (its deploy time moved past `before`) and the
    application is running again: every replica ran `reconfigure` with it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        details = (rest(dashboard, "GET").get("applications") or {}).get(APP) or {}
        if details.get("last_deployed_time_s") != before and details.get("status") == "RUNNING":
            return
        if details.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            log.error(f"serve application {APP!r} {details['status']}: {details.get('message', '')[-2000:]}")
            raise UserError(f"the endpoint became {details['status']} after the change; see `serve status` on the cluster")
        time.sleep(0.5)
    raise UserError(f"the endpoint did not apply the change within {timeout_s:.0f}s; see `serve status` on the cluster")
