"""Operator load/unload of registry versions on the running endpoint (issue 26, item 2):
keep a version loaded on every Generator replica, ahead of its traffic and outside the
replicas' LRU, or let go of it.

    raylab deploy acme-assistant/3 --load      # through the service when $RAYLAB_API_URL is set
    raylab deploy acme-assistant/3 --unload
    curl -H "Authorization: Bearer $ADMIN_KEY" -d '{"ref": "acme-assistant/3"}' http://HOST/v1/registry/load

Like `raylab deploy`, a change of the Generator's `user_config` through Serve's REST API (its
`pinned` list, read by generator.GeneratorBase.reconfigure): no replica restarts, and
replicas started later load the list too. Routing is unchanged: every registered version is
servable by name; an unloaded one is loaded again on demand by the next request for it.
"""

from __future__ import annotations

import logging
import time

from raylab import registry
from raylab.core import events
from raylab.errors import UserError
from raylab.serve.deploy import APP, dashboard_of, deployed, put_app, resolve, rest

log = logging.getLogger(__name__)


def run_load(ref: str, load: bool = True, address: str | None = None, tracking_uri: str | None = None) -> dict:
    """Keep REF loaded on every Generator replica of the running endpoint (`load`), ahead of
    its traffic and outside the replicas' LRU, or let go of it (`load=False`). Routing is not
    changed: every registered version is already servable by name. A `user_config` change of
    the Generator (its `pinned` list): replicas stay up, and new ones load the list too.
    Returns once Serve reports the application running with the change."""
    dashboard = dashboard_of(address)
    current, app = deployed(dashboard)
    generator = next(d for d in app["deployments"] if d["name"] == "Generator")
    conf = dict(generator.get("user_config") or {})
    if app["args"].get("tracking_uri") is None:
        raise UserError("this endpoint serves a plain model (no registry): there are no versions to load or unload")
    store = registry.open_store(tracking_uri=tracking_uri or app["args"]["tracking_uri"])
    name, version, _ = resolve(store, ref)  # checksums verified here, before any replica loads it
    target, pinned = f"{name}/{version}", list(conf.get("pinned", []))
    if load and target not in pinned:
        limit = app["args"]["limits"]["max_adapters_per_replica"]
        if len(pinned) >= limit:
            raise UserError(f"{len(pinned)} versions are loaded on this endpoint already, as many as "
                            f"serve.max_adapters_per_replica ({limit}) allows; unload one first")
        pinned.append(target)
    elif not load:
        if target not in pinned:
            raise UserError(f"{target} is not loaded on this endpoint by an operator; nothing to unload")
        pinned.remove(target)
    else:  # already loaded: nothing to change
        return {"model": target, "loaded": True, "changed": False}
    generator["user_config"] = conf | {"pinned": pinned}
    before = ((current.get("applications") or {}).get(APP) or {}).get("last_deployed_time_s")
    put_app(dashboard, app, {}, current)
    _wait_applied(dashboard, before)
    events.emit("serve.load" if load else "serve.unload", run=registry.version_run(registry.get_version(store, target)),
                model=name, version=version, ref=ref, dashboard=dashboard)
    log.info(f"{'loaded' if load else 'unloaded'} {ref} ({target}) on every replica")
    return {"model": target, "loaded": load, "changed": True}


def _wait_applied(dashboard: str, before: float | None, timeout_s: float = 300) -> None:
    """Until Serve has taken the new config (its deploy time moved past `before`) and the
    application is running again: every replica ran `reconfigure` with it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        details = (rest(dashboard, "GET").get("applications") or {}).get(APP) or {}
        if details.get("last_deployed_time_s") != before and details.get("status") == "RUNNING":
            return
        if details.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise UserError(f"serve application {APP!r} {details['status']}: {details.get('message', '')[-2000:]}")
        time.sleep(0.5)
    raise UserError(f"the endpoint at {dashboard} did not apply the change within {timeout_s:.0f}s; see `serve status`")
