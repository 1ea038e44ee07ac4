"""`raylab serve` and `raylab deploy`: put a registry version behind the OpenAI-compatible
endpoint of app.py, and switch it to another version without downtime; or serve a plain
model (a Hugging Face directory, an exported model, a hub id) with no registry entry.

    raylab serve configs/quickstart.yaml                  # <model_name>@production, foreground
    raylab serve --model exported/acme                    # a plain model, named `acme` in requests
    raylab serve configs/quickstart.yaml --emit-config serve.yaml   # for `serve deploy` / RayService
    raylab deploy acme-assistant@production               # after `raylab models promote`

Both go through Serve's declarative API (the dashboard's `PUT /api/serve/applications/`,
what `serve deploy` and KubeRay's RayService use), never `serve.run`: Serve then treats a
change of `user_config` alone as a lightweight update, so `raylab deploy` re-routes the
running replicas through `reconfigure` instead of starting new ones (which a 2-core machine
has no room for) and no in-flight request fails.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from raylab import models, registry
from raylab.config import ExplainConfig, RaylabConfig, ServeConfig
from raylab.core import cluster, controldb, events, plan, runs, signals, storage
from raylab.core.cluster import auth_token
from raylab.errors import UserError
from raylab.serve.auth import api_keys

log = logging.getLogger(__name__)


APP = "raylab"


def catalog(store: registry.Store, name: str, version: int) -> dict:
    """The ingress's routing table: the name and `NAME@production` (or whichever alias was
    asked for) go to `version`, every alias and `NAME/N` to its own version."""
    model = registry.registered_model(store, name)
    target = f"{name}/{version}"
    routes = {name: target}
    aliases = {f"{name}@{a}": f"{name}/{int(v)}" for a, v in sorted(model.aliases.items())}
    numbers = sorted((int(mv.version) for mv in store.client.search_model_versions(f"name = '{name}'")), reverse=True)
    versions = {f"{name}/{n}": f"{name}/{n}" for n in numbers}
    routes |= aliases | versions
    production = f"{name}@{registry.PRODUCTION}"
    listed = [name] + ([production] if production in aliases else []) + sorted(set(aliases) - {production}) + list(versions)
    return {"routes": routes, "listed": listed, "default": target}


def resolve(store: registry.Store, ref: str) -> tuple[str, int, str]:
    """(name, version, verified local dir) of a REF; checksums are checked before deploying."""
    mv = registry.get_version(store, ref)
    return mv.name, int(mv.version), models.locate(f"{mv.name}/{mv.version}", store)


def plain(ref: str) -> bool:
    """A model served as it is, without a registry entry: a Hugging Face directory (an
    exported model, a trained final/), a hub id or a preset; not NAME@ALIAS or NAME/VERSION."""
    return not models.is_registry_ref(ref)


def plain_catalog(ref: str) -> tuple[str, str, dict]:
    """(served name, local directory or hub id, routing table) of a plain model: requests
    name it by the directory's basename, or by the hub id."""
    local = models.locate(ref)  # exit 2 for a path with no model
    if os.path.isdir(local):
        local = os.path.abspath(local)  # the replicas run in another directory
        name = ref if ref.startswith("preset:") else Path(local).name
    else:
        name = local  # a hub id, fetched by each replica
    return name, local, {"routes": {name: local}, "listed": [name], "default": local, "registry": False}


def default_ref(cfg: RaylabConfig | None, model: str | None) -> str:
    if model:
        return model
    if cfg is None:
        raise UserError("give a CONFIG (its registry.model_name is served) or --model NAME@ALIAS | NAME/VERSION")
    return f"{registry.model_name(cfg)}@{registry.PRODUCTION}"


def explainer_config(s: ServeConfig, ex: ExplainConfig) -> tuple[dict, dict]:
    """(the args the ingress and Explainer read, the Explainer's deployment entry) for
    `serve.explain`: its limits and request defaults come from the `explain:` section."""
    e = s.explain
    for key, default, limit in (("n_steps", ex.n_steps, e.max_n_steps), ("samples", ex.samples, e.max_samples),
                                ("evals", ex.evals, e.max_evals)):
        if default > limit:
            raise UserError(f"explain.{key} ({default}) is above serve.explain.max_{key} ({limit}): a request "
                            f"without {key} would be refused; lower the one or raise the other")
    args = {"defaults": {"method": ex.method, "n_steps": ex.n_steps, "samples": ex.samples, "evals": ex.evals,
                         "baseline": ex.baseline},
            "limits": {"max_prompt_tokens": ex.max_prompt_tokens, "max_target_tokens": ex.max_target_tokens,
                       "max_n_steps": e.max_n_steps, "max_samples": e.max_samples, "max_evals": e.max_evals},
            "max_models_per_replica": e.max_models_per_replica, "keep_results": e.keep_results,
            "keep_seconds": e.keep_seconds}
    a = s.autoscaling  # the endpoint's delays; one explanation at a time per replica is the target
    autoscaling = {"min_replicas": e.min_replicas, "max_replicas": e.max_replicas,
                   "target_ongoing_requests": e.max_ongoing_requests, "upscale_delay_s": a.upscale_delay_s,
                   "downscale_delay_s": a.downscale_delay_s, "look_back_period_s": a.look_back_period_s}
    deployment = {"name": "Explainer", "autoscaling_config": autoscaling, "max_ongoing_requests": e.max_ongoing_requests,
                  "max_queued_requests": e.max_queued_requests, "ray_actor_options": {"num_cpus": e.cpus_per_replica}}
    return args, deployment


def app_config(s: ServeConfig, store: registry.Store | None, ref: str, dtype: str = "float32",
               ex: ExplainConfig | None = None, rag: dict | None = None, monitor: dict | None = None,
               api: dict | None = None, oidc: dict | None = None) -> dict:
    """A `serve deploy` config (one application) serving REF, with the routing table. A
    plain model (`plain(ref)`) needs no registry: `store` may be None. With
    `serve.explain.enabled` the Explainer deployment is in it too (limits from `ex`). `rag`:
    the Embedder's arguments (retrieval.rag_args) when `serve.rag` attaches an index.
    `monitor`: the served-prompt sample's settings (monitor_args). `api`: the fine-tuning
    service's (api_args), mounted in the same ingress. `oidc`: governance.oidc, when the
    endpoint accepts OIDC tokens (serve.oidc; oidc_args)."""
    if plain(ref):
        _, local, routing = plain_catalog(ref)
        target = local
    else:
        name, version, local = resolve(store, ref)
        target, routing = f"{name}/{version}", catalog(store, name, version)
    kind, base = models.identify(local)
    base = base if kind == "adapter" else None  # adapters of one base share its replicas' engine
    a = s.autoscaling
    autoscaling = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                   "target_ongoing_requests": a.target_ongoing_requests, "upscale_delay_s": a.upscale_delay_s,
                   "downscale_delay_s": a.downscale_delay_s, "look_back_period_s": a.look_back_period_s}
    if a.initial_replicas is not None:
        autoscaling["initial_replicas"] = a.initial_replicas
    args = {"base": base, "tracking_uri": store.uri if store is not None else None,
            "dtype": "float32" if dtype == "auto" else dtype,
            "threads": max(1, round(s.cpus_per_replica)), "api_keys_env": s.api_keys_env, "api_keys_file": s.api_keys_file,
            "api_keys_database": controldb.url() if s.api_keys_db else None,
            "limits": {"max_prompt_tokens": s.max_prompt_tokens, "max_tokens": s.max_tokens,
                       "max_request_bytes": s.max_request_bytes, "max_batch_size": s.max_batch_size,
                       "batch_wait_timeout_s": s.batch_wait_timeout_s, "stream_interval_ms": s.stream_interval_ms,
                       "max_adapters_per_replica": s.max_adapters_per_replica, "resubmit_timeout_s": s.resubmit_timeout_s},
            "rag": rag,
            "engine": s.engine, "vllm": s.vllm.model_dump()}
    args["canary"] = s.canary.model_dump()  # `raylab deploy --canary` reads its thresholds from the deployed app
    if monitor is not None:  # absent from configs written before it: the ingress then samples nothing
        args["monitor"] = monitor
    if api is not None:
        args["api"] = api
    if oidc is not None:
        args["oidc"] = oidc
    generator = {"name": "Generator", "autoscaling_config": autoscaling, "max_ongoing_requests": s.max_ongoing_requests,
                 "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica,
                                       **replica_memory(s)},
                 "user_config": {"preload": [target]}}
    # The ingress only awaits the generator: a sliver of a CPU, and room for every open stream.
    ingress = {"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 1000,
               "ray_actor_options": {"num_cpus": 0.1}, "user_config": routing}
    deployments = [generator, ingress]
    if s.explain.enabled:
        args["explain"], explainer = explainer_config(s, ex or ExplainConfig())
        deployments.append(explainer)
    if rag is not None:
        from raylab.serve.retrieval import deployment_config

        deployments.append(deployment_config(s.rag))
    return {"name": APP, "route_prefix": "/", "import_path": "raylab.serve:build", "args": args,
            "deployments": deployments}


def replica_memory(s: ServeConfig) -> dict:
    """The Generator's memory reservation: on CPU, vLLM's KV cache (serve.vllm.kv_cache_gb) is
    allocated up front in the replica's engine process, so Ray is told, and places replicas
    where that much is free instead of crowding out the object store. Nothing is reserved
    with the transformers engine (its cache grows with the batch) or on GPUs (the cache is in
    GPU memory)."""
    if s.engine == "transformers" or s.gpus_per_replica:
        return {}
    return {"memory": int(s.vllm.kv_cache_gb * 2**30)}


def monitor_args(cfg: RaylabConfig | None) -> dict | None:
    """The Ingress's served-prompt sample (serve.monitor): where it writes, how much it keeps,
    and the data stage's PII detectors it redacts with; None without a config's run
    directory or with serve.monitor.sample_prompts: 0."""
    if cfg is None or cfg.serve.monitor.sample_prompts == 0:
        return None
    m, pii = cfg.serve.monitor, cfg.data.pii
    output_dir = cfg.output_dir if "://" in cfg.output_dir else os.path.abspath(cfg.output_dir)  # replicas run elsewhere
    return {"output_dir": output_dir, "sample_prompts": m.sample_prompts, "flush_every": m.flush_every,
            "pii": {"types": pii.types, "engine": pii.engine, "regions": pii.regions} if pii.enabled else None}


def api_args(cfg: RaylabConfig | None) -> dict | None:
    """The fine-tuning service in the ingress (api.enabled): the config as YAML (every job's
    template) and the control-plane database the replicas use; None when it is off."""
    if cfg is None or not cfg.api.enabled:
        return None
    from raylab import config

    return {"config": config.to_yaml(cfg), "database": controldb.url()}


def oidc_args(cfg: RaylabConfig | None) -> dict | None:
    """governance.oidc for the ingress when the endpoint accepts OIDC tokens (serve.oidc)."""
    if cfg is None or not cfg.serve.oidc:
        return None
    return cfg.governance.oidc.model_dump(mode="json")


def rag_args(cfg: RaylabConfig | None, check: bool = True) -> dict | None:
    """serve.rag's Embedder arguments, its index checked (exit 2 before anything deploys);
    check=False for a rendered config, whose index may be built after rendering."""
    if cfg is None or cfg.serve.rag is None:
        return None
    # Ray Serve and the rag extra are imported only when serve.rag asks for them
    from raylab.serve.retrieval import rag_args as checked

    return checked(cfg, check)


def deploy_config(s: ServeConfig, app: dict) -> dict:
    return {"proxy_location": "EveryNode", "http_options": {"host": s.host, "port": s.port}, "applications": [app]}


def emit_text(cfg: RaylabConfig | None, ref: str, tracking_uri: str | None = None) -> str:
    """The serve config that `serve deploy` and a RayService's serveConfigV2 take, as YAML
    (`raylab render --target serve`; `raylab serve --emit-config` writes the same)."""
    import yaml

    s = cfg.serve if cfg else ServeConfig()
    store = None if plain(ref) else registry.open_store(cfg, tracking_uri)
    full = deploy_config(s, app_config(s, store, ref, cfg.model.dtype if cfg else "float32", cfg.explain if cfg else None,
                                       rag_args(cfg, check=False), monitor_args(cfg), api_args(cfg), oidc_args(cfg)))
    return ("# written by `raylab render --target serve` (`raylab serve --emit-config`); deploy with `serve deploy` "
            "or embed in a RayService's serveConfigV2\n" + yaml.safe_dump(full, sort_keys=False))


def emit(path: str, cfg: RaylabConfig | None, ref: str, tracking_uri: str | None = None) -> dict:
    """Write the serve config that `serve deploy` and a RayService's serveConfigV2 take."""
    import yaml

    text = emit_text(cfg, ref, tracking_uri)
    storage.write_text(path, text)
    return yaml.safe_load(text)


# ---------------------------------------------------------------- Serve's REST API


def _headers() -> dict:
    token = auth_token() if os.environ.get("RAY_AUTH_MODE", "token") == "token" else None
    return {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})


def rest(dashboard: str, method: str, body: dict | None = None, timeout: float = 60, attempts: int = 6):
    """Serve's REST API. GET and PUT are idempotent (PUT is declarative), so a dropped
    connection (the dashboard is busy while Serve starts) is retried. A refused connection
    (nothing listens there: a wrong --address, Ray down) is asked once more only, so a wrong
    address is an answer in a second, not after the whole backoff (23 s)."""
    url = dashboard.rstrip("/") + "/api/serve/applications/"
    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(attempts):
        req = urllib.request.Request(url, data=data, method=method, headers=_headers())
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode()
            return json.loads(text) if text.strip() else {}
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == attempts - 1:
                raise UserError(f"Ray Serve at {dashboard} refused {method}: HTTP {e.code} {e.read().decode()[:2000]}") from None
        except (urllib.error.URLError, OSError) as e:
            refused = isinstance(getattr(e, "reason", e), ConnectionRefusedError)
            if attempt == attempts - 1 or (refused and attempt >= 1):
                raise UserError(f"Ray dashboard {dashboard} not reachable ({getattr(e, 'reason', e)}); pass its "
                                "http:// address with --address") from None
        time.sleep(min(1.0 * 2 ** attempt, 8.0))
    raise AssertionError("unreachable")


def put_app(dashboard: str, app: dict, http_options: dict, current: dict | None = None) -> None:
    """Deploy/update our application, keeping any other declaratively deployed ones.
    `current`: Serve's state (GET) when the caller has already read it."""
    current = rest(dashboard, "GET") if current is None else current
    others = [details["deployed_app_config"] for n, details in (current.get("applications") or {}).items()
              if n != APP and details.get("deployed_app_config")]
    if current.get("http_options"):  # Serve's HTTP options are fixed once it runs
        http_options = {k: current["http_options"][k] for k in ("host", "port") if k in current["http_options"]}
    rest(dashboard, "PUT", {"proxy_location": current.get("proxy_location") or "EveryNode",
                            "http_options": http_options, "applications": others + [app]})


def wait_running(dashboard: str, timeout_s: float = 600) -> dict:
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        details = (rest(dashboard, "GET").get("applications") or {}).get(APP) or {}
        status = details.get("status")
        if status == "RUNNING":
            return details
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            why = [details.get("message", "")] + [f"{n}: {d.get('message', '')}" for n, d in
                                                  (details.get("deployments") or {}).items() if d.get("message")]
            raise UserError(f"serve application {APP!r} {status}: {' | '.join(why)[-4000:]}")
        if status != last and status:
            log.info(f"serve: {status.lower()} ...")
            last = status
        time.sleep(1.0)
    raise UserError(f"serve application {APP!r} not running after {timeout_s:.0f}s")


# ---------------------------------------------------------------- the verbs


def _endpoint_file() -> Path:
    return runs.home().endpoint


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds; TIME_WAIT is no conflict
        try:
            sock.bind((host if host != "0.0.0.0" else "", port))
            return True
        except OSError:
            return False


def start_serving(cfg: RaylabConfig | None, model: str | None = None, address: str | None = None,
                  detach: bool = False) -> dict:
    """Deploy REF (checksums verified first) and return once the endpoint is RUNNING:
    {url, model (NAME/VERSION), models, dashboard, ...}. `raylab run` uses this directly."""
    s = cfg.serve if cfg else ServeConfig()
    # The ingress reads the same keys when it starts; reading them here first makes an unset
    # variable or an empty keys file exit 2 before anything is deployed (or opened).
    api_keys({"api_keys_env": s.api_keys_env, "api_keys_file": s.api_keys_file})
    ref = default_ref(cfg, model)
    store = None if plain(ref) else registry.open_store(cfg)
    app = app_config(s, store, ref, cfg.model.dtype if cfg else "float32",  # exit 2 before Ray starts
                     cfg.explain if cfg else None, rag_args(cfg), monitor_args(cfg), api_args(cfg), oidc_args(cfg))
    embedded = cluster.mode_of(cluster.resolve_address(address, cfg)[0]) == "embedded"
    if detach and embedded:
        raise UserError("--detach needs a running cluster (ray start --head; then --address auto): an embedded Ray "
                        "ends with this process")
    if embedded and not _port_free(s.host, s.port):
        raise UserError(f"serve.port: {s.host}:{s.port} is in use; stop what holds it or set serve.port=PORT")
    if cfg is not None:
        conn, _ = plan.prepare(cfg, address, state_api=True)
    else:
        conn = cluster.connect(None, address, state_api=True)
    dashboard = _dashboard(conn)
    put_app(dashboard, app, {"host": s.host, "port": s.port})
    wait_running(dashboard)
    url = f"http://{'127.0.0.1' if s.host in ('0.0.0.0', '') else s.host}:{s.port}"
    routing = app["deployments"][1]["user_config"]
    info = {"url": url, "ref": ref, "model": routing["default"], "name": routing["listed"][0], "dashboard": dashboard,
            "pid": os.getpid(), "tracking_uri": store.uri if store is not None else None, "models": routing["listed"],
            "run": cfg.output_dir if cfg is not None else None, "ray_address": _gcs_address()}
    storage.write_text(str(_endpoint_file()), json.dumps(info, indent=2))
    name, version = (info["model"].rsplit("/", 1) if store is not None else (info["name"], None))
    events.emit("serve.start", run=info["run"], model=name, version=version, url=url, ref=ref)
    log.info(f"serving {ref} ({info['model']}) at {url}/v1  (models: {', '.join(info['models'])})")
    return info


def _gcs_address() -> str | None:
    """The Ray cluster the endpoint runs on (`raylab deploy --canary` starts its controller there)."""
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # a Ray Client connection has no GCS address of its own to share
        return None


def stop_serving() -> None:
    """Delete the application (its replicas stop); forget the endpoint file."""
    from ray import serve

    info = json.loads(storage.read_text(str(_endpoint_file()))) if _endpoint_file().exists() else {}
    try:
        serve.delete(APP)
    finally:
        _endpoint_file().unlink(missing_ok=True)
    if info.get("tracking_uri"):  # a registry version, NAME/VERSION
        name, _, version = (info.get("model") or "").rpartition("/")
    else:  # a plain model
        name, version = info.get("name") or "", ""
    events.emit("serve.stop", run=info.get("run"), model=name or None, version=version or None, url=info.get("url"))


def run_serve(cfg: RaylabConfig | None, model: str | None = None, address: str | None = None, detach: bool = False,
              stop: threading.Event | None = None) -> dict:
    """`raylab serve`: deploy REF and (unless `detach`) stay in the foreground until
    SIGINT/SIGTERM or `stop`, then delete the application."""
    info = start_serving(cfg, model, address, detach)
    if not detach:
        wait_until_stopped(stop)
        log.info("stopping the endpoint ...")
        stop_serving()
    return info


def wait_until_stopped(stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    # run_serve from Python (a notebook, a test) gives the caller its own handlers back
    with signals.callers_handlers(signal.SIGINT, signal.SIGTERM) as main_thread:
        if main_thread:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        log.info("foreground: Ctrl-C (SIGINT) or SIGTERM stops it; `raylab deploy REF` switches versions")
        stop.wait()


def _wait_routed(url: str, target: str, canary: str | None = None, timeout_s: float = 300) -> None:
    """Until the ingress answers /healthz with the new default and canary (its reconfigure ran)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
                health = json.loads(r.read())
            if health.get("model") == target and health.get("canary") == canary:
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise UserError(f"the endpoint at {url} did not switch to {target} within {timeout_s:.0f}s; see `serve status`")


def _dashboard(conn) -> str:
    url = os.environ.get("RAY_API_SERVER_ADDRESS") or conn.dashboard_url
    if not url:
        raise UserError("the Ray dashboard (Serve's REST API) is not known for this cluster; set RAY_API_SERVER_ADDRESS "
                        "to http://HEAD:8265")
    return url if "://" in url else f"http://{url}"


def endpoint_info() -> dict:
    """What `raylab serve` recorded about the endpoint running here ({} when none)."""
    return json.loads(storage.read_text(str(_endpoint_file()))) if _endpoint_file().exists() else {}


def dashboard_of(address: str | None) -> str:
    """The Ray dashboard (Serve's REST API) of `--address`, else of the `raylab serve` here."""
    dashboard = address or endpoint_info().get("dashboard")
    if dashboard is None:
        raise UserError("no running `raylab serve` found on this machine; pass the dashboard with --address http://HEAD:8265")
    if "://" not in dashboard:
        raise UserError(f"--address {dashboard!r}: expected the Ray dashboard's http://HOST:PORT")
    return dashboard


def deployed(dashboard: str) -> tuple[dict, dict]:
    """(Serve's state, our application's deployed config); exit 2 when none is deployed."""
    current = rest(dashboard, "GET")
    details = (current.get("applications") or {}).get(APP)
    if not details or not details.get("deployed_app_config"):
        raise UserError(f"no raylab application is deployed at {dashboard}; start one with `raylab serve`")
    return current, details["deployed_app_config"]


def deployment(app: dict, name: str) -> dict:
    """A deployment's entry in our application's deployed config (exit 2 if it has none)."""
    found = next((d for d in app.get("deployments", []) if d.get("name") == name), None)
    if found is None:
        raise UserError(f"the application {APP!r} has no {name} deployment: not an endpoint `raylab serve` deployed")
    return found


def ingress_config(app: dict) -> dict:
    """The Ingress's user_config (its routing table, and the canary while one runs)."""
    return deployment(app, "Ingress")["user_config"]


def switch(dashboard: str, store: registry.Store, name: str, version: int, canary: dict | None = None,
           current: dict | None = None, app: dict | None = None) -> str:
    """Route the endpoint's model to NAME/VERSION (the Generator preloads it first), with
    `canary` ({candidate, percent, controller, namespace}) sending a share of its production
    traffic to the candidate, or without one. `user_config` changes only: no replica restarts.
    Returns the endpoint's URL once its ingress answers with the new table."""
    if app is None:
        current, app = deployed(dashboard)
    target = f"{name}/{version}"
    for d in app["deployments"]:
        if d["name"] == "Generator":  # the operator's loaded versions (run_load) stay loaded
            d["user_config"] = (d.get("user_config") or {}) | {"preload": [target] + ([canary["candidate"]] if canary else [])}
        elif d["name"] == "Ingress":
            d["user_config"] = catalog(store, name, version) | ({"canary": canary} if canary else {})
    put_app(dashboard, app, {}, current)
    http = current.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    _wait_routed(url, target, canary["candidate"] if canary else None)
    return url


def run_deploy(ref: str, address: str | None = None, tracking_uri: str | None = None) -> dict:
    """Point the running endpoint at REF: the generator preloads (and verifies) it, then the
    ingress's routes switch to it. Both are `user_config` changes: replicas stay up."""
    dashboard = dashboard_of(address)
    current, app = deployed(dashboard)
    running = ingress_config(app).get("canary")
    if running:  # its controller would switch the endpoint again when it decides
        raise UserError(f"a canary rollout of {running['candidate']} is running on this endpoint; wait for its "
                        "decision (`raylab deploy --status`) before deploying another version")
    store = registry.open_store(tracking_uri=tracking_uri or app["args"]["tracking_uri"])
    name, version, _ = resolve(store, ref)
    target = f"{name}/{version}"
    switch(dashboard, store, name, version, None, current, app)
    events.emit("serve.deploy", run=registry.version_run(registry.get_version(store, target)), model=name, version=version, ref=ref,
                dashboard=dashboard)
    log.info(f"deployed {ref} ({target}); requests for {name} now go to it")
    return {"model": target}

