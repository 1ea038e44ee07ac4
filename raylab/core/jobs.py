"""`raylab submit CONFIG --address http://HEAD:8265`: run the pipeline as a Ray job.

    raylab submit configs/quickstart.yaml --address http://127.0.0.1:8265
    raylab submit configs/quickstart.yaml output_dir=s3://acme/runs/q1 --no-serve --env HF_TOKEN
    raylab submit configs/quickstart.yaml --until data --no-wait     # print the job id, return

The library API (what `raylab submit` and the fine-tuning service call):

    from raylab.core import jobs
    url = "http://HEAD:8265"
    job_id = jobs.submit(cfg, url, flags=["--until", "data"])   # a loaded config; raylab.submit takes a path
    jobs.wait(job_id, url, timeout_s=600)                       # -> JobStatus (status, exit code, run)
    jobs.status(job_id, url); jobs.logs(job_id, url); jobs.events(job_id, url); jobs.stop(job_id, url)

A config loaded from a file inside the working directory is re-read there by the job (`raylab
run CONFIG overrides`, its relative paths resolving in the job's copy); any other config (a
file elsewhere, a config built in Python) travels resolved, as YAML text in the job's
environment variable RAYLAB_JOB_CONFIG, read by `raylab run --config-env RAYLAB_JOB_CONFIG`.
(The `raylab submit` CLI still asks for CONFIG inside the working directory, as it always has.)

`raylab submit` is the same as `ray job submit --working-dir . -- python -m raylab run CONFIG ...`, plus:

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
import dataclasses
import logging
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from raylab.core import events as events_module
from raylab.core import runs, secrets
from raylab.core.cluster import auth_token
from raylab.errors import UserError

if TYPE_CHECKING:
    from raylab.config import RaylabConfig

# Settings a run reads from the environment, carried to the job when set here.
CARRIED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
           "HF_TOKEN", "HF_HUB_OFFLINE", "RAYLAB_DATABASE_URL", "RAYLAB_AUDIT", "RAYLAB_AUDIT_CHECKPOINTS",
           "RAYLAB_AUDIT_KMS_KEY")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONFIG_ENV = "RAYLAB_JOB_CONFIG"  # a config that travels as YAML text: `raylab run --config-env CONFIG_ENV`
MAX_CONFIG_ENV = 100_000  # bytes; Linux refuses a single environment string over 128 KiB

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
    """`raylab run CONFIG overrides flags` for a config file inside the working directory."""
    return _command(["run", require_inside(config_path, working_dir), *overrides, *flags])


def require_inside(config_path: str, working_dir: str) -> str:
    """The config file's path relative to the working directory; a UserError when it lies
    outside (what `raylab submit` asks: the job re-reads CONFIG in its copy of the directory)."""
    rel = os.path.relpath(Path(config_path).resolve(), Path(working_dir).resolve())
    if rel.startswith(".."):
        raise UserError(f"CONFIG {config_path} is outside the working directory {working_dir}: the job only gets that "
                        "directory; move the config into it or pass --working-dir")
    return rel


def env_entrypoint(flags: list[str], name: str = CONFIG_ENV) -> str:
    """`raylab run --config-env NAME flags`: the config is the YAML text in $NAME."""
    return _command(["run", "--config-env", name, *flags])


def _command(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "raylab", *args])


def _inside(path: str | os.PathLike | None, working_dir: str) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(Path(working_dir).resolve())


def config_yaml(cfg: RaylabConfig) -> str:
    """The resolved config as YAML text (defaults filled, paths absolute, secrets references)."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if len(text.encode()) > MAX_CONFIG_ENV:
        raise UserError(f"the config is {len(text.encode())} bytes as YAML, too large to travel in an environment "
                        f"variable (at most {MAX_CONFIG_ENV}); put the config file inside the working directory")
    return text


def job_spec(cfg: RaylabConfig, *, path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
             working_dir: str = ".", env: list[str] | tuple[str, ...] = (),
             flags: list[str] | tuple[str, ...] = ()) -> tuple[str, dict]:
    """(entrypoint, runtime_env) for a config: `path` (the file `cfg` was loaded from with
    `overrides`) when the job can re-read it inside `working_dir`, else the YAML in CONFIG_ENV."""
    renv = runtime_env(cfg, working_dir, list(env))
    if _inside(path, working_dir):
        return entrypoint(str(path), working_dir, list(overrides), list(flags)), renv
    renv["env_vars"][CONFIG_ENV] = config_yaml(cfg)
    return env_entrypoint(list(flags)), renv


def submit(config: RaylabConfig, address: str | None = None, *, path: str | os.PathLike | None = None,
           overrides: list[str] | tuple[str, ...] = (), working_dir: str = ".", env: list[str] | tuple[str, ...] = (),
           flags: list[str] | tuple[str, ...] = ()) -> str:
    """Submit `raylab run` for a loaded config as a Ray job; returns the job id at once.

    `path`/`overrides`: the file `config` was loaded from and the overrides applied (a file
    inside `working_dir` is re-read by the job); `env`: NAME or NAME=VALUE to carry; `flags`:
    `raylab run` flags (`--until data`, `--no-serve`). `raylab.submit` takes a path instead."""
    url = dashboard_address(address)
    working_dir = str(Path(working_dir).resolve())
    if not Path(working_dir).is_dir():
        raise UserError(f"--working-dir {working_dir}: not a directory")
    cmd, renv = job_spec(config, path=path, overrides=overrides, working_dir=working_dir, env=env, flags=flags)
    if "://" not in config.output_dir and config.output_dir.startswith(working_dir + os.sep):
        log.info(f"note: output_dir {config.output_dir} is under the working directory; in the job it resolves inside "
                 "Ray's copy of that directory on the head node. Use output_dir=s3://... or a shared path to keep the "
                 "results.")
    jobs = client(url)
    job_id = f"raylab-{config.run_name}-{uuid.uuid4().hex[:8]}"
    _submit(jobs, url, entrypoint=cmd, runtime_env=renv, submission_id=job_id,
            metadata={"raylab_run": config.run_name, "raylab_output_dir": config.output_dir})
    log.info(f"submitted job {job_id} to {url}: {cmd}")
    carried = sorted(k for k in renv["env_vars"] if k != CONFIG_ENV)
    log.info(f"  carried env: {', '.join(carried) or '-'}; "
             f"logs: ray job logs --address {url} -f {job_id}; stop: ray job stop --address {url} {job_id}")
    return job_id


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


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """A job as `status` reports it: Ray's status (PENDING, RUNNING, SUCCEEDED, FAILED,
    STOPPED), the entrypoint's exit code once it ended, Ray's message, and the raylab run."""

    job_id: str
    status: str
    driver_exit_code: int | None = None
    message: str | None = None
    run_name: str | None = None
    output_dir: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_info(cls, job_id: str, info) -> JobStatus:
        """From Ray's JobDetails (get_job_info)."""
        metadata = getattr(info, "metadata", None) or {}
        return cls(job_id=job_id, status=str(getattr(info.status, "value", info.status)),
                   driver_exit_code=info.driver_exit_code, message=info.message or None,
                   run_name=metadata.get("raylab_run"), output_dir=metadata.get("raylab_output_dir"))


def status(job_id: str, address: str | None = None) -> JobStatus:
    """The job's status, exit code, message and run (its output_dir)."""
    return JobStatus.from_info(job_id, _job_info(client(dashboard_address(address)), job_id))


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    jobs = client(dashboard_address(address))
    _job_info(jobs, job_id)  # an unknown id is a UserError, not Ray's 404 traceback
    return bool(jobs.stop_job(job_id))


def logs(job_id: str, address: str | None = None) -> str:
    """Everything the job has printed so far."""
    jobs = client(dashboard_address(address))
    _job_info(jobs, job_id)
    return jobs.get_job_logs(job_id)


def wait(job_id: str, address: str | None = None, timeout_s: float | None = None, poll_s: float = 1.0) -> JobStatus:
    """Block until the job ends; its final status. TimeoutError after `timeout_s` (None: no limit)."""
    jobs = client(dashboard_address(address))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        current = JobStatus.from_info(job_id, _job_info(jobs, job_id))
        if current.terminal:
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {current.status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def events(job_id: str, address: str | None = None) -> list[dict]:
    """The run's events (core/events.py), oldest first: read from the events file in the
    job's output_dir, so it must be reachable from here (s3://, a shared path)."""
    current = status(job_id, address)
    if not current.output_dir:
        raise UserError(f"job {job_id} was not submitted by raylab: its metadata names no raylab_output_dir")
    return events_module.read(runs.Run(current.output_dir).events)


def follow(job_id: str, address: str | None = None) -> int:
    """Tail the job's logs to stdout until it ends, then log its status: the exit code
    `raylab submit` ends with (`exit_code`); Ctrl-C stops the job and returns 130."""
    jobs = client(dashboard_address(address))
    try:
        asyncio.run(_tail(jobs, job_id))
        info = _wait_terminal(jobs, job_id, timeout_s=60)
    except KeyboardInterrupt:
        log.info(f"\ninterrupted: stopping job {job_id}")
        jobs.stop_job(job_id)
        info = _wait_terminal(jobs, job_id, timeout_s=60)
        log.info(f"job {job_id}: {info.status}")
        return 130
    final = JobStatus.from_info(job_id, info)
    log.info(summary(final))
    return exit_code(final)


def exit_code(status: JobStatus) -> int:
    """0 when the job SUCCEEDED, the entrypoint's own exit code when it FAILED (2 for a config
    or data problem), else 1 (stopped, the driver died, not ended)."""
    if status.status == "SUCCEEDED":
        return 0
    code = status.driver_exit_code
    if status.status == "FAILED" and isinstance(code, int) and 0 < code < 256:
        return code
    return 1


def summary(status: JobStatus) -> str:
    """The line `raylab submit` ends with: `job ID: STATUS (entrypoint exit code N): message`."""
    if status.status == "SUCCEEDED":
        return f"job {status.job_id}: SUCCEEDED"
    code = status.driver_exit_code
    return (f"job {status.job_id}: {status.status}" + (f" (entrypoint exit code {code})" if code is not None else "")
            + (f": {status.message}" if status.message and status.status != "FAILED" else ""))


def _job_info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError(f"job {job_id}: no such job on this cluster") from None
        raise


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
