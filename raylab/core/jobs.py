"""`raylab submit CONFIG --address http://HEAD:8265`: run the pipeline as a Ray job.

    raylab submit configs/quickstart.yaml --address http://127.0.0.1:8265
    raylab submit configs/quickstart.yaml output_dir=s3://acme/runs/q1 --no-serve --env HF_TOKEN
    raylab submit configs/quickstart.yaml --until data --no-wait     # print the job id, return

The same as `ray job submit --working-dir . -- python -m raylab run CONFIG ...`, plus:

- the config is loaded here first, so a config problem is exit 2 before anything is sent;
- the job's runtime_env carries the working directory (the current one unless
  `--working-dir`; `.gitignore`d files stay behind, as with `ray job submit`), the raylab
  package itself when it lives elsewhere (`py_modules`: the cluster runs this checkout's code),
  and environment variables: every `${env:NAME}` the config references, MLflow / AWS /
  Hugging Face settings set here (`CARRIED`), and each `--env NAME[=VALUE]`. They are visible
  to anyone who can read the job's details on the dashboard;
- the job's logs are tailed here; the exit code is the job's: 0 when it SUCCEEDED, the
  entrypoint's own exit code when it FAILED (2 for a problem in the config or data, as locally),
  1 when it was stopped elsewhere or the driver died; Ctrl-C stops the job and exits 130.

`output_dir` should be storage every node and you can reach (`s3://...`, a shared mount): a
relative path lands in the job's temporary copy of the working directory on the head node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from raylab.core import secrets
from raylab.core.cluster import auth_token
from raylab.errors import UserError

if TYPE_CHECKING:
    from raylab.config import RaylabConfig

# Settings a run reads from the environment, carried to the job when set here.
CARRIED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
           "HF_TOKEN", "HF_HUB_OFFLINE")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

log = logging.getLogger(__name__)


def dashboard_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else an http:// $RAY_ADDRESS."""
    for value, origin in ((address, "--address"), (os.environ.get("RAY_API_SERVER_ADDRESS"), "RAY_API_SERVER_ADDRESS"),
                          (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")):
        if not value:
            continue
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
        if origin == "--address":
            raise UserError(f"--address {value!r}: jobs go to the Ray dashboard, http://HEAD:8265 (not the GCS or ray:// port)")
    raise UserError("--address is required: the Ray dashboard of the cluster, e.g. --address http://HEAD:8265")


def runtime_env(cfg: RaylabConfig, working_dir: str, env: list[str]) -> dict:
    """What travels with the job: files, the raylab package, environment variables."""
    carried: dict[str, str] = {}
    for name in CARRIED:
        if os.environ.get(name):
            carried[name] = os.environ[name]
    for key, name in secrets.env_refs(cfg.model_dump(mode="json")):
        if name in os.environ:
            carried[name] = os.environ[name]
        else:
            log.warning(f"{key} references ${{env:{name}}}, not set here: the cluster's environment must provide it")
    for item in env:
        name, sep, value = item.partition("=")
        if not name.isidentifier():
            raise UserError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if not sep and name not in os.environ:
            raise UserError(f"--env {name}: {name} is not set here; give --env {name}=VALUE")
        carried[name] = value if sep else os.environ[name]
    renv: dict = {"working_dir": working_dir, "env_vars": carried}
    package = Path(__file__).resolve().parents[1]  # the raylab package
    if not package.is_relative_to(Path(working_dir).resolve()):
        renv["py_modules"] = [str(package)]
    return renv


def entrypoint(config_path: str, working_dir: str, overrides: list[str], flags: list[str]) -> str:
    import shlex

    rel = os.path.relpath(Path(config_path).resolve(), Path(working_dir).resolve())
    if rel.startswith(".."):
        raise UserError(f"CONFIG {config_path} is outside the working directory {working_dir}: the job only gets that "
                        "directory; move the config into it or pass --working-dir")
    return " ".join(shlex.quote(a) for a in ["python", "-m", "raylab", "run", rel, *overrides, *flags])


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    _check_dashboard(address)
    token = auth_token() if os.environ.get("RAY_AUTH_MODE", "token") == "token" else None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given; the
    # cluster named here is the one meant (a RAY_ADDRESS for another cluster is common).
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError as e:
        raise UserError(f"--address {address}: no Ray dashboard answers there ({e}); start the cluster or fix the "
                        "address (http://HEAD:8265)") from None
    except Exception as e:  # ray.exceptions.AuthenticationError: a missing or wrong token
        if "Authentication" not in type(e).__name__:
            raise
        raise UserError(f"--address {address}: the dashboard refused the token ({str(e).splitlines()[0]}); use the "
                        "cluster's token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and RAY_AUTH_MODE=token") from None
    finally:
        os.environ.update(hidden)


def _check_dashboard(address: str, timeout_s: float = 5.0) -> None:
    """A closed port is named as such: Ray's client checks the token first, so without one
    a typo in the address would read as an authentication problem."""
    import socket
    import urllib.parse

    url = urllib.parse.urlsplit(address)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "127.0.0.1", port), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"--address {address}: no Ray dashboard answers there ({e.strerror or e}); start the cluster "
                        "or fix the address (http://HEAD:8265)") from None


def submit(cfg: RaylabConfig, config_path: str, overrides: list[str], address: str | None, flags: list[str],
           working_dir: str = ".", env: list[str] | None = None, wait: bool = True) -> int:
    """Submit `raylab run` as a job; returns the exit code `raylab submit` ends with."""
    url = dashboard_address(address)
    working_dir = str(Path(working_dir).resolve())
    if not Path(working_dir).is_dir():
        raise UserError(f"--working-dir {working_dir}: not a directory")
    cmd = entrypoint(config_path, working_dir, overrides, flags)
    renv = runtime_env(cfg, working_dir, env or [])
    if "://" not in cfg.output_dir and cfg.output_dir.startswith(working_dir + os.sep):
        log.info(f"note: output_dir {cfg.output_dir} is under the working directory; in the job it resolves inside Ray's "
            "copy of that directory on the head node. Use output_dir=s3://... or a shared path to keep the results.")
    jobs = client(url)
    job_id = f"raylab-{cfg.run_name}-{uuid.uuid4().hex[:8]}"
    _submit(jobs, url, entrypoint=cmd, runtime_env=renv, submission_id=job_id,
            metadata={"raylab_run": cfg.run_name, "raylab_output_dir": cfg.output_dir})
    log.info(f"submitted job {job_id} to {url}: {cmd}")
    log.info(f"  carried env: {', '.join(sorted(renv['env_vars'])) or '-'}; "
        f"logs: ray job logs --address {url} -f {job_id}; stop: ray job stop --address {url} {job_id}")
    if not wait:
        return 0
    try:
        asyncio.run(_tail(jobs, job_id))
        info = _wait_terminal(jobs, job_id, timeout_s=60)
    except KeyboardInterrupt:
        log.info(f"\ninterrupted: stopping job {job_id}")
        jobs.stop_job(job_id)
        info = _wait_terminal(jobs, job_id, timeout_s=60)
        log.info(f"job {job_id}: {info.status}")
        return 130
    return exit_code(info, job_id)


def _submit(jobs, url: str, timeout_s: float = 60, **job) -> None:
    """Submit; a head whose job agent is still starting answers 500 "No available agent",
    so that is retried for a while (as Ray's message asks)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            jobs.submit_job(**job)
            return
        except RuntimeError as e:
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise UserError(f"the cluster at {url} did not accept the job: {e}") from None


async def _tail(jobs, job_id: str) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _wait_terminal(jobs, job_id: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        info = jobs.get_job_info(job_id)
        if str(info.status) in TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(1)


def exit_code(info, job_id: str) -> int:
    status = str(info.status)
    if status == "SUCCEEDED":
        log.info(f"job {job_id}: SUCCEEDED")
        return 0
    code = info.driver_exit_code
    log.info(f"job {job_id}: {status}" + (f" (entrypoint exit code {code})" if code is not None else "")
        + (f": {info.message}" if info.message and status != "FAILED" else ""))
    if status == "FAILED" and isinstance(code, int) and 0 < code < 256:
        return code
    return 1
