"""Connecting to Ray and planning what raylab will ask it for.

Address precedence (DESIGN.md): `--address`, else `RAY_ADDRESS`, else `ray.address` in the
config, else an embedded local Ray started with `ray.init(address="local")`.

    auto              join the cluster running on this machine (what `ray job submit` gives)
    HOST:PORT         join a cluster by its GCS address
    ray://HOST:10001  a Ray Client session (interactive; same Ray and Python minor version)

Token authentication (on by default for local clusters since Ray 2.59) is always made
explicit: `RAY_AUTH_MODE` is set for this process and everything it starts, from
`ray.auth` in the config, else the environment, else `token`. Without that, joining by an
explicit address fails or succeeds depending on whether ~/.ray/auth_token happened to exist.

The resource plan is in `raylab.core.plan`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raylab.core import audit, crypto, runs, storage
from raylab.errors import RunFailed, UserError

if TYPE_CHECKING:  # core takes a config but imports no config module (it is the lowest layer)
    from raylab.config import RaylabConfig

log = logging.getLogger(__name__)

# Everything raylab starts sends nothing anywhere.
TELEMETRY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}


def physical_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def auth_mode(cfg: RaylabConfig | None) -> str:
    if cfg is not None and cfg.ray.auth:
        return cfg.ray.auth
    mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if mode not in ("token", "disabled"):
        raise UserError(f"RAY_AUTH_MODE={mode!r} is not supported; expected token or disabled")
    return mode


def process_env(cfg: RaylabConfig | None) -> dict[str, str]:
    """Environment raylab sets for itself and passes to every Ray worker it starts."""
    env = dict(TELEMETRY_ENV)
    env["RAY_AUTH_MODE"] = auth_mode(cfg)
    if cfg is not None and cfg.offline:
        env |= OFFLINE_ENV
    # Ray Data's per-dataset INFO lines from every split coordinator drown the progress line.
    env["RAY_DATA_LOG_LEVEL"] = os.environ.get("RAY_DATA_LOG_LEVEL", "WARNING")
    # Ray Train's print patch echoes each worker print twice on the driver's console.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if os.environ.get("RAYLAB_HOME"):  # workers materialise presets where the driver does
        env["RAYLAB_HOME"] = os.environ["RAYLAB_HOME"]
    # governance.database and governance.audit: workers' events join their driver's audit chain.
    env.update(audit.process_env(cfg))
    # governance.encryption: every worker seals what it writes (no key material, a path or a KMS key id).
    env.update(crypto.process_env(cfg))
    return env


# `offline: true`: the hub libraries read these at import, and transformers asks the hub's.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def apply_offline(cfg: RaylabConfig | None) -> None:
    """`offline: true` for this process, before any model or tokenizer loads (validate and
    doctor too, which would otherwise spend most of a minute retrying an unreachable hub).
    huggingface_hub reads the variable when first imported, so an already imported one is
    switched as well."""
    if cfg is None or not cfg.offline:
        return
    os.environ.update(OFFLINE_ENV)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def apply_process_env(cfg: RaylabConfig | None) -> dict[str, str]:
    env = process_env(cfg)
    os.environ.update(env)
    apply_offline(cfg)
    if "ray._raylet" in sys.modules:
        # Ray caches its config (auth mode included) when first imported; re-read it as
        # Ray's own token setup does, or a token-mode GCS starts without a token and hangs.
        from ray._raylet import Config

        Config.initialize("")
    return env


def resolve_address(cli_address: str | None, cfg: RaylabConfig | None) -> tuple[str | None, str]:
    """(address or None for embedded, where it came from)."""
    if cli_address:
        return cli_address, "--address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if cfg is not None and cfg.ray.address:
        return cfg.ray.address, "ray.address"
    if "ray" in sys.modules:
        import ray
        from ray.util.client import ray as client_ray

        if client_ray.is_connected():  # a notebook that ran ray.init("ray://HOST:10001") before calling raylab
            return "ray://connected", "ray.init (Ray Client)"
        if ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE:
            return ray.get_runtime_context().gcs_address, "the Ray task this runs in"
    return None, "embedded"


def mode_of(address: str | None) -> str:
    if address is None or address == "local":
        return "embedded"
    return "client" if address.startswith("ray://") else "cluster"


def embedded_cpus(cfg: RaylabConfig | None) -> float:
    """Logical CPUs of the embedded Ray. More than the cores on small machines: Ray Data
    needs a free CPU beside busy Train workers or it waits forever (RAY_NOTES.md); torch
    threads are set explicitly per worker so compute is not oversubscribed."""
    if cfg is not None and cfg.ray.num_cpus:
        return cfg.ray.num_cpus
    return float(max(4, 2 * physical_cores()))


def detected_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install must not stop CPU work
        return 0


def embedded_gpus(cfg: RaylabConfig | None) -> int:
    if cfg is not None and cfg.ray.num_gpus is not None:
        return cfg.ray.num_gpus
    return detected_gpus()


@dataclass
class Connection:
    mode: str  # embedded | cluster | client
    address: str | None
    origin: str
    auth: str
    dashboard_url: str | None = None


def auth_token() -> str | None:
    """Ray's token: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def _token_available() -> bool:
    return auth_token() is not None


def _token_origin() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return "~/.ray/auth_token"


def _check_auth_accepted(hostport: str, address: str, origin: str, mode: str, auth: str,
                         timeout_s: float = 10.0) -> None:
    """One cheap authenticated call, so a refused token fails in a second and says which
    setting to fix: `ray.init` retries the GCS for about 20 s (30 s through Ray Client)
    and then reports only that it could not connect. The GCS (its cluster id) or the Ray
    Client proxy (a ping, which starts no per-client server) answers UNAUTHENTICATED to a
    missing or wrong token; any other answer is left to `ray.init` to judge."""
    import grpc

    metadata = [("authorization", f"Bearer {auth_token()}")] if auth == "token" else []
    channel = grpc.insecure_channel(hostport)
    try:
        if mode == "client":
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

            ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=timeout_s, metadata=metadata)
        else:
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            return  # slow, TLS, another Ray version: ray.init decides and reports
        if auth == "token":
            raise UserError(
                f"Ray at {address!r} (from {origin}) refused the auth token from {_token_origin()}: "
                "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, the head "
                "node's ~/.ray/auth_token"
            ) from None
        raise UserError(
            f"Ray at {address!r} (from {origin}) requires token authentication but ray.auth / "
            "RAY_AUTH_MODE is 'disabled': set RAY_AUTH_MODE=token (or ray.auth: token) and "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the head node's ~/.ray/auth_token"
        ) from None
    finally:
        channel.close()


def _check_reachable(address: str, origin: str, timeout_s: float = 5.0) -> str:
    """Fail fast on a closed port: Ray itself retries for about a minute before giving up.
    Returns the HOST:PORT that answered."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r} (from {origin}): expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(
            f"Ray address {address!r} (from {origin}): nothing answers at {host}:{port} ({e.strerror or e}). "
            "Start a cluster with `ray start --head`, fix the address, or unset it for an embedded local Ray"
        ) from None
    return hostport


def _recorded_address(origin: str) -> str:
    """The cluster `ray start` recorded on this machine (what `auto` joins)."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))  # honours RAY_TMPDIR
    recorded = path.read_text().strip() if path.exists() else ""
    if not recorded:
        raise UserError(
            f"Ray address 'auto' (from {origin}): no cluster was started on this machine ({path} is "
            "missing); start one with `ray start --head`, give its HOST:PORT, or unset the address "
            "for an embedded local Ray"
        )
    return recorded


def connect(cfg: RaylabConfig | None = None, address: str | None = None, state_api: bool = False) -> Connection:
    """Connect this process to Ray (idempotent) and return how it is connected.

    `state_api`: an embedded Ray also starts its dashboard (on a free local port), which
    serves Ray's state API; Ray Train and Tune use it to clean up after a dead driver."""
    import ray

    address, origin = resolve_address(address, cfg)
    mode = mode_of(address)
    env = apply_process_env(cfg)
    if ray.is_initialized():
        return Connection(mode, address, origin, env["RAY_AUTH_MODE"], _current_dashboard())
    if mode != "embedded" and env["RAY_AUTH_MODE"] == "token" and not _token_available():
        raise UserError(
            f"Ray address {address!r} (from {origin}): token authentication is on but no token "
            "was found; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, copy the head node's "
            "~/.ray/auth_token, or set ray.auth=disabled for a cluster without authentication"
        )
    if address == "auto":
        hostport = _check_reachable(_recorded_address(origin), f"{origin}=auto, recorded by `ray start`")
    elif mode != "embedded":
        hostport = _check_reachable(address, origin)
    if mode != "embedded":
        _check_auth_accepted(hostport, address, origin, mode, env["RAY_AUTH_MODE"])
    namespace = cfg.ray.namespace if cfg is not None else "raylab"
    dashboard_port = None
    if os.environ.get("RAY_API_SERVER_ADDRESS") == _started_api_server.get("url"):
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # ours, from an embedded Ray now gone
    if mode == "embedded" and (state_api or (cfg is not None and cfg.ray.dashboard)):
        # Ray's state API, called without an address (as Ray Train's own actors do), looks
        # for the cluster `ray start` last recorded on this machine, not this embedded one:
        # name our dashboard explicitly, for this process and every worker.
        dashboard_port = _free_port()
        _started_api_server["url"] = env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = env["RAY_API_SERVER_ADDRESS"]
    kwargs = dict(namespace=namespace, runtime_env={"env_vars": _without_job_env(env)}, logging_level=logging.WARNING)
    try:
        if mode == "embedded":
            context = ray.init(
                address="local",
                num_cpus=embedded_cpus(cfg),
                # Ray detects GPUs itself; counting them here would import torch (~2 s).
                num_gpus=cfg.ray.num_gpus if cfg is not None else None,
                include_dashboard=dashboard_port is not None,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                # Ray's metrics agent exports on Prometheus with the dashboard off too; a fixed
                # port lets a Prometheus scrape the embedded Ray (docs/serving.md, Monitoring)
                _metrics_export_port=cfg.ray.metrics_export_port if cfg is not None else None,
                **kwargs,
            )
        else:
            if mode == "client":
                # No job-level runtime_env through Ray Client: the proxy then starts the
                # per-client server through the runtime-env agent, a path seen failing at
                # start-up here. The cluster's own environment applies to its workers.
                kwargs.pop("runtime_env")
                context = _init_client(address, origin, kwargs)
            else:
                context = ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise UserError(
            f"could not connect to a Ray cluster at {address!r} (from {origin}): {one_line(e)}. Start one "
            "with `ray start --head`, fix the address, or unset it for an embedded local Ray. "
            "If the cluster is up, it may have refused authentication: check ray.auth / "
            "RAY_AUTH_MODE and the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"
        ) from None
    except Exception as e:  # auth failures surface as several exception types across modes
        if "auth" in type(e).__name__.lower() or re.search(r"authenticat|invalid token|token (is )?(invalid|missing)", str(e), re.I):
            raise UserError(
                f"Ray at {address!r} (from {origin}) refused authentication: {one_line(e)}. Use the "
                "cluster's token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and RAY_AUTH_MODE=token"
            ) from None
        raise
    dashboard = getattr(context, "dashboard_url", None) or None
    return Connection(mode, address, origin, env["RAY_AUTH_MODE"], dashboard)


# How Ray's client proxy reports that the per-client server it started did not open its port
# in time (RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S on the head, 30 s by default: a busy head
# takes longer than that to start one Python process), or that the process died at start-up
# (the proxy forks it while gRPC threads run; seen dying with "epoll_wait error: Bad file
# descriptor" or silently, about 1 start in 4 on a 2-core machine under heavy load).
CLIENT_PROXY_START_FAILURES = ("Proxy failed to Connect to backend", "Starting Ray client server failed")


def _init_client(address: str, origin: str, kwargs: dict, attempts: int = 2, pause_s: float = 5.0):
    """`ray.init("ray://...")`, once more after a pause when the proxy failed to start this
    session's server (a second start finds Ray's modules in the page cache); after that a
    clear error naming the head's setting and logs, not Ray's proxy traceback."""
    import time

    import ray

    failure = ""
    for attempt in range(1, attempts + 1):
        try:
            return ray.init(address=address, **kwargs)
        except ConnectionAbortedError as e:
            if not any(sig in str(e) for sig in CLIENT_PROXY_START_FAILURES):
                raise
            failure = _last_line(str(e))
            log.warning(
                "Ray Client proxy at %s failed to start this session's server (attempt %d of %d)",
                address, attempt, attempts)
            if attempt < attempts:
                time.sleep(pause_s)
    raise UserError(
        f"Ray Client at {address!r} (from {origin}): the head's client proxy failed to start a "
        f"session server {attempts} times (Ray: {failure}). A busy head may not start one within "
        "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S (30 s by default), or its server died at "
        "start-up: start the head with a larger value in its environment, or submit a job "
        "instead (`raylab submit`); ray_client_server*.err in the head's session logs say more"
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else text


def run_stage(fn, cfg: RaylabConfig, address: str | None, **kwargs):
    """Run a stage in this process, or, in a Ray Client session, as a task on the cluster's
    head node: Ray Data's executor and Ray Train's controller need a real Ray worker process,
    which a client session is not (Ray's own advice for libraries through Ray Client). Its
    printed progress reaches the client like any task's output; its result comes back."""
    # governance.encryption from the first write on: a stage's events precede its Ray connection
    os.environ.update(crypto.process_env(cfg))
    if crypto.active() is not None:  # a wrong key stops the stage before it writes anything
        run = runs.Run(cfg.output_dir)
        for location in (run.resolved_config, run.manifest):
            storage.check_key(location)
    resolved, _ = resolve_address(address, cfg)
    if mode_of(resolved) != "client":
        return fn(cfg, address=address, **kwargs)
    connect(cfg, address)
    import ray

    task = ray.remote(num_cpus=0, max_retries=0, resources={"node:__internal_head__": 0.001})(_with_console)
    try:
        return ray.get(task.remote(fn, cfg, address=None, **kwargs))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (UserError, RunFailed)):  # the config or data, or dead workers: not a bug
            raise e.cause from None
        raise


def _with_console(fn, cfg, **kwargs):
    """A stage run as a task: its progress lines go to the task's stdout, which reaches the client."""
    from raylab.core import logs

    logs.console()
    return fn(cfg, **kwargs)


def _current_dashboard() -> str | None:
    """The connected cluster's dashboard (host:port), as `ray.init` reported it. No public API
    gives it after the fact; without it, serving from a Ray job could not find Serve's REST API."""
    try:
        from ray._private.worker import get_dashboard_url

        return get_dashboard_url() or None
    except Exception:  # Ray Client sessions have no local node
        return None


def _without_job_env(env: dict[str, str]) -> dict[str, str]:
    """Inside a Ray job (`ray job submit`, `raylab submit`), Ray refuses a driver runtime_env
    that sets a variable the job's runtime_env already sets: the job's value wins."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    job_env = ((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    return {k: v for k, v in env.items() if k not in job_env}


_started_api_server: dict[str, str] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(e: Exception) -> str:
    """A connection error for the user: a Ray Client server's failure message can carry that
    server's own traceback (seen: its proxier meeting a zombie process), which is Ray's, not
    something the user can fix; keep what precedes it and the exception it ended in."""
    text = str(e)
    head, found, tail = text.partition("Traceback (most recent call last):")
    if not found:
        return text
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    return " ".join(part for part in (head.strip(), last) if part)
