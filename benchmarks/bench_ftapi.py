"""The fine-tuning service (issue 26): how long `jobs.create` takes to reach the first training
step against the same config run from the CLI, and job-state request latency under 20
concurrent clients.

    python benchmarks/bench_ftapi.py            (or: make bench NAME=ftapi)
    python benchmarks/bench_ftapi.py --smoke    # 1 pair, 4 clients x 5 requests: checks the script; writes no result

Protocol: benchmarks/README.md (version 1). Written before it was run (item 9):

- **Cluster.** `cluster/local.sh start 0`: one head node, 2 CPUs, token authentication, its
  own ports and temp dir, started by this script and stopped at the end. $RAYLAB_HOME is a
  fresh directory (control-plane SQLite database, registry) for every process here.
- **Service.** `raylab api TEMPLATE --standalone` in its own process (so the clients below do
  not share its interpreter), jobs going to the cluster's dashboard. The template: the tiny
  preset (`preset:tiny-llama`), LoRA, `train.max_steps` 8, `log_every` 1, otherwise defaults.
  One key (`ml_engineer`, org acme); one upload of 64 chat examples (deterministic, this file's
  `examples`), made once, untimed.
- **Overhead** (`first_step`; seconds, lower is better). A: `POST /v1/fine_tuning/jobs` on the
  upload (validation with the data stage's rules, the job's config, Ray Jobs submission, the
  job's driver starting `raylab run --no-serve`), timed from just before the request to the
  moment the job's run directory's `train/metrics.jsonl` holds a row with step >= 1 (polled
  every 0.1 s from this process; the window also holds the GET of the job's generated config,
  which names that directory, a few milliseconds against a minute); then the job is cancelled
  through the API. B: `raylab run
  CONFIG --no-serve --address 127.0.0.1:PORT` as a subprocess, CONFIG being the very config the
  service generated for a first job (its first result file; that job is cancelled at once) with
  a fresh `output_dir`,
  timed from spawn to the same first-step row; then the process is interrupted. Both run the
  data stage then Ray Train on the same cluster from the same uploaded file; what A adds is the
  service. (The issue says "run with `raylab train`": a job runs the data stage before
  training, so B runs the same stages as a job, with `raylab run`, or B would skip work A
  does.) Between samples the script waits until the cluster's 2 CPUs are free again. 5 pairs,
  A and B alternating, one untimed warm-up of each. Goal (issue 26): A / B <= 1.2.
- **Job state** (`job_state_p99`; milliseconds, lower is better). 20 client threads in this
  process, each with its own keep-alive HTTP connection, each sending 25 sequential `GET
  /v1/fine_tuning/jobs/{id}` (A) or, as the baseline, 25 `GET /v1/files/{id}` of the upload (B:
  the same authentication and one database row, no job state); per round the p99 of all 500
  latencies of a side; 5 rounds, A and B alternating. Measured twice: for a job that is
  `running` (`n_epochs` 200, about 1,600 steps, so it trains throughout; each read of a running
  job asks the Ray dashboard for its state) and for a `cancelled` one (a database read). The issue
  sets no goal for it: recorded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BASE = "preset:tiny-llama"
FULL = {"pairs": 5, "clients": 20, "requests": 25, "rounds": 5, "warmup": True}
SMOKE = {"pairs": 1, "clients": 4, "requests": 5, "rounds": 1, "warmup": False}
GOAL_OVERHEAD = 1.2
FIRST_STEP_TIMEOUT_S = 900


def examples(n: int = 64) -> bytes:
    return "\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Which shelf holds part number {i}?"},
        {"role": "assistant", "content": f"Part number {i} is on shelf {i * 7 % 19}, row {i % 5}."}]})
        for i in range(n)).encode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`cluster/local.sh start 0` on its own ports; `idle()` waits for its CPUs to be free."""

    def __init__(self, work: Path, env: dict):
        self.port, dashboard = free_port(), free_port()
        self.env = {**env, "PORT": str(self.port), "DASHBOARD_PORT": str(dashboard), "CLIENT_PORT": str(free_port()),
                    "AGENT_PORT": str(free_port()), "CPUS_PER_NODE": "2", "STATE_DIR": str(work / "cluster"),
                    "TEMP_DIR": f"/tmp/rlb-ray-{self.port}", "RAY": str(BIN / "ray"), "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        try:
            done = subprocess.run(["bash", "cluster/local.sh", "start", "0"], cwd=REPO, env=self.env,
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            self.stop()
            raise SystemExit("cluster/local.sh start did not finish in 300 s") from None
        if done.returncode != 0:
            self.stop()
            raise SystemExit(f"cluster/local.sh start failed:\n{done.stdout}\n{done.stderr}")
        import ray

        try:
            ray.init(address=f"127.0.0.1:{self.port}", logging_level="ERROR")
        except Exception:
            self.stop()
            raise

    def idle(self, timeout_s: float = 300) -> None:
        import ray

        deadline = time.monotonic() + timeout_s
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 2):
            if time.monotonic() > deadline:
                raise SystemExit(f"the cluster's CPUs are still busy after {timeout_s:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        import ray

        ray.shutdown()
        subprocess.run(["bash", "cluster/local.sh", "stop"], cwd=REPO, env=self.env, capture_output=True, timeout=180)
        shutil.rmtree(self.env["TEMP_DIR"], ignore_errors=True)


class Service:
    """`raylab api TEMPLATE --standalone` in its own process, with one ml_engineer key."""

    def __init__(self, work: Path, env: dict, dashboard: str):
        from raylab.core import controldb
        from raylab.core.access import keys

        template = {"version": 1, "output_dir": str(work / "template"), "offline": True,
                    "data": {"sources": [{"type": "jsonl", "path": str(work / "unused.jsonl")}], "format": "chat"},
                    "model": {"name_or_path": BASE, "method": "lora"},
                    "train": {"max_steps": 8, "log_every": 1},
                    "api": {"address": dashboard, "files": str(work / "files"), "runs": str(work / "runs")}}
        path = work / "template.yaml"
        path.write_text(yaml.safe_dump(template))
        self.key = keys.create(controldb.url(), "acme", "ml_engineer", "bench", by="bench")[0]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(work / "api.log", "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([str(BIN / "raylab"), "api", str(path), "--standalone", "--port", str(port)],
                                         env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            try:
                self.get("/v1/files")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"raylab api did not start: {(work / 'api.log').read_text()[-3000:]}") from None
                time.sleep(0.5)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        headers = {"Authorization": f"Bearer {self.key}", **({"Content-Type": content_type} if body else {})}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, body, headers, method=method),
                                    timeout=120) as r:
            return r.read()

    def get(self, path: str):
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: dict | None = None):
        return json.loads(self.request("POST", path, json.dumps(body or {}).encode()))

    def upload(self, data: bytes) -> str:
        boundary = "raylab-bench-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\n"
                "Content-Disposition: form-data; name=\"file\"; filename=\"parts.jsonl\"\r\n"
                "Content-Type: application/jsonl\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        return json.loads(self.request("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}"))["id"]

    def create(self, file_id: str) -> tuple[dict, dict]:
        """A new job on the upload and the config the service generated for it."""
        job = self.post("/v1/fine_tuning/jobs", {"model": BASE, "training_file": file_id, "suffix": "bench"})
        if job["status"] == "failed":
            raise SystemExit(f"the job failed at once: {job['error']}")
        return job, yaml.safe_load(self.request("GET", f"/v1/files/{job['result_files'][0]}/content"))

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def first_step(output_dir: str, started: float, proc: subprocess.Popen | None = None) -> float:
    """Seconds from `started` until the run's metrics.jsonl holds a row with step >= 1."""
    from raylab.core import runs

    path = Path(runs.Run(output_dir).train_metrics)
    while time.perf_counter() - started < FIRST_STEP_TIMEOUT_S:
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):  # not there yet, or caught mid-write
            rows = []
        if any(r.get("step", 0) >= 1 for r in rows):
            return time.perf_counter() - started
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"raylab run exited {proc.returncode} before its first step ({output_dir})")
        time.sleep(0.1)
    raise SystemExit(f"no first step in {output_dir} after {FIRST_STEP_TIMEOUT_S} s")


def latencies(url: str, key: str, path: str, clients: int, requests: int) -> list[float]:
    """Seconds per request of `clients` threads, each sending `requests` GETs on its own connection."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    out: list[float] = []
    lock, start = threading.Lock(), threading.Barrier(clients)

    def client() -> None:
        conn, mine = http.client.HTTPConnection(host, port, timeout=120), []
        start.wait()
        for _ in range(requests):
            t = time.perf_counter()
            conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: {resp.status}")
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if len(out) != clients * requests:
        raise SystemExit(f"GET {path}: {clients * requests - len(out)} requests failed")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes; the JSON goes to the work directory only")
    smoke = parser.parse_args().smoke
    sizes = SMOKE if smoke else FULL
    if not smoke:
        common.require_clean_commit()
    work = Path(tempfile.mkdtemp(prefix="bench-ftapi-"))
    os.environ["RAYLAB_HOME"] = str(work / "home")
    os.environ.pop("RAYLAB_DATABASE_URL", None)
    os.environ["RAY_AUTH_MODE"] = "token"  # the cluster's, for this process's ray.init as for every other process
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    cluster = Cluster(work, env)
    service = None
    records = []
    try:
        service = Service(work, env, cluster.dashboard)
        file_id = service.upload(examples())
        first, generated = service.create(file_id)  # its config is B's
        service.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel")
        cluster_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{cluster.port}"}
        counter = iter(range(1000))

        def a() -> float:
            started = time.perf_counter()
            job, cfg = service.create(file_id)
            seconds = first_step(cfg["output_dir"], started)
            service.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
            cluster.idle()
            return seconds

        def b() -> float:
            cfg = {**generated, "output_dir": str(work / f"cli-{next(counter)}")}
            path = work / "cli.yaml"
            path.write_text(yaml.safe_dump(cfg))
            started = time.perf_counter()
            proc = subprocess.Popen([str(BIN / "raylab"), "run", str(path), "--no-serve", "--address",
                                     cluster_env["RAY_ADDRESS"]], env=cluster_env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                return first_step(cfg["output_dir"], started, proc)
            finally:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                cluster.idle()

        cluster.idle()
        got = common.alternate(a, b, sizes["pairs"], warmup=sizes["warmup"])
        records.append(common.point(
            "seconds from jobs.create to the first training step", "s",
            ("raylab api POST /v1/fine_tuning/jobs (Ray job)", got["a"]), ("raylab run --no-serve (CLI)", got["b"]),
            goal=f"A / B <= {GOAL_OVERHEAD} (issue 26)", goal_ratio=GOAL_OVERHEAD, higher_is_better=False,
            warmup=sizes["warmup"], load=got["load"], examples=64, max_steps=8, threads="Ray's plan (2 CPUs)"))
        records += job_state_points(service, file_id, sizes)
    finally:
        if service is not None:
            service.stop()
        cluster.stop()
    if smoke:
        out = work / "ftapi-smoke.json"
        out.write_text(json.dumps(records, indent=2))
        print(f"smoke: {out}", file=sys.stderr)
    else:
        common.write_results("ftapi", records)
        shutil.rmtree(work, ignore_errors=True)


def job_state_points(service: Service, file_id: str, sizes: dict) -> list[dict]:
    """The job-state latency points: a running job (n_epochs 200) and, after it is cancelled,
    the same job as a database read."""
    long_job = service.post("/v1/fine_tuning/jobs", {"model": BASE, "training_file": file_id, "suffix": "long",
                                                     "method": {"type": "supervised", "supervised": {
                                                         "hyperparameters": {"n_epochs": 200}}}})
    deadline = time.monotonic() + FIRST_STEP_TIMEOUT_S
    while service.get(f"/v1/fine_tuning/jobs/{long_job['id']}")["status"] != "running":
        if time.monotonic() > deadline:
            raise SystemExit(f"job {long_job['id']} did not start running")
        time.sleep(1)
    points = []
    for state in ("running", "cancelled"):
        if state == "cancelled":
            service.post(f"/v1/fine_tuning/jobs/{long_job['id']}/cancel")
        job_path, file_path = f"/v1/fine_tuning/jobs/{long_job['id']}", f"/v1/files/{file_id}"
        got = common.alternate(
            lambda p=job_path: common.percentile(latencies(service.url, service.key, p, sizes["clients"],
                                                           sizes["requests"]), 0.99) * 1000,
            lambda p=file_path: common.percentile(latencies(service.url, service.key, p, sizes["clients"],
                                                            sizes["requests"]), 0.99) * 1000,
            sizes["rounds"], warmup=True)
        now = service.get(f"/v1/fine_tuning/jobs/{long_job['id']}")["status"]
        if now != state:  # the figure must be of the state it is named for
            raise SystemExit(f"job {long_job['id']} was {now}, not {state}, when its {state} rounds ended")
        points.append(common.point(
            f"job-state request p99, {sizes['clients']} concurrent clients, a {state} job", "ms",
            (f"GET /v1/fine_tuning/jobs/{{id}} ({state})", got["a"]), ("GET /v1/files/{id}", got["b"]),
            goal=None, higher_is_better=False, warmup=True, load=got["load"], clients=sizes["clients"],
            requests_per_client=sizes["requests"]))
    return points


if __name__ == "__main__":
    main()
