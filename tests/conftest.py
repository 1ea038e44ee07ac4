"""Shared fixtures. Later stages reuse these rather than starting their own Ray.

- `raylab_home` (autouse): a per-session $RAYLAB_HOME (and audit signing key), so tests never
  touch ~/.raylab or ~/.config/raylab.
- `tiny_model_dir`: a tiny causal LM + byte-level tokenizer saved with save_pretrained.
- `ray_local`: the session-wide embedded Ray (started once through raylab.cluster.connect).
- `learn_data`: a corpus through the data stage once; `reference`: a LoRA adapter trained on it once.
- `ray_head`: a real `ray start --head` cluster in a subprocess (for auto / HOST:PORT / ray://).
- `two_node_cluster`: two Ray nodes on this machine (ray.cluster_utils.Cluster), one per session;
  tests that use it are marked `multinode` and run last, since it replaces the session Ray.
- `cli_here`: `raylab ARGS` in this process, for commands that need no process of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # explicit, so results never depend on test order
# Ray Train's controller polls its workers every 2 s; a test run's loop lasts a few seconds, so
# each run waited out several polls (about 5 of its ~20 s in Ray Train). Every Ray the tests
# start (embedded, CLI subprocesses, `ray start`) inherits this; users keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train 2.60 starts a PreemptionWatcher actor (its own Python worker process, polling the
# GCS every 5 s) for every worker group it starts: each train run, tune trial and worker
# restart here, ~70 in CI, on 2 cores. No test here drains a node (spot preemption); the
# controller reads this setting and passes it to its actors. Users keep Ray's default.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# shap (explain method shap, its only user here) compiles its numba kernels on first use: 8 s on
# an idle core, 30 s on a busy 2-core machine, once per process. The tests' prompts are a few
# tokens, where the plain-Python kernels take a fraction of a second; users keep the JIT, which
# pays off on long prompts (200 tokens, 500 evaluations: 1 s an explanation against 8 s).
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")
# A shell without job control starts a background command (`make test &`, nohup) with SIGINT
# ignored, and every process it starts inherits that: test_submit's Ctrl-C test then sent its
# SIGINT to a `raylab submit` that could not receive it (the job ran on, exit 0). The tests'
# processes get Python's default handler, however pytest was started. (It showed only on xdist,
# where that test came first in its worker: in one pytest, an earlier in-process train run had
# left Ray Train's own SIGINT handler installed, replacing the ignore; raylab now puts the
# caller's handler back after fit(), raylab/core/signals.py.)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# `make test` runs the unit and the single-Ray integration tests on two pytest-xdist workers (one
# pytest keeps one of 2 cores busy). A worker that starts a Ray gets its own temp root, so
# session directories and the address `ray start` records for `auto` never mix between workers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"/tmp/rl-{os.environ['PYTEST_XDIST_WORKER']}"  # short: socket paths < 108 bytes
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


def pytest_configure(config):
    # Workers started by this process share ~/.ray/auth_token: create it once here, before
    # they start, rather than have two of them write different tokens at once.
    if not os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "numprocesses", None):
        ensure_auth_token()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "multinode" in item.keywords:
            item.add_marker(pytest.mark.integration)
    # Multi-node tests tear down the session Ray: run them after everything else. The longest
    # modules go first, so that two xdist workers (`--dist loadfile --no-loadscope-reorder`,
    # which keeps this order) never end with one long module running alone.
    items.sort(key=lambda item: ("multinode" in item.keywords, _slow_rank(item)))


# The slowest integration modules, longest first: seconds on two xdist workers (the sum of
# --durations per module, 2026-12-07; test_serve_vllm's fixture failed in that run). Only the order
# changes: every module runs, each in one worker. Re-measure when a module grows a lot.
SLOW_FIRST = ("test_submit",          # 857
              "test_eval",            # 583
              "test_serve",           # 485
              "test_train",           # 398
              "test_family_configs",  # 355
              "test_tune",            # 343
              "test_encryption",      # 291
              "test_data",            # 270
              "test_serve_vllm",      # 198 alone, beside test_submit's Ctrl-C test
              "test_connect",         # 219
              "test_fsdp",            # 120
              "test_pretrain")        # 120


def _slow_rank(item) -> int:
    name = item.path.stem
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)


@pytest.fixture(scope="session", autouse=True)
def raylab_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("raylab_home")
    old = os.environ.get("RAYLAB_HOME")
    os.environ["RAYLAB_HOME"] = str(home)
    # The audit log's signing key lives apart from $RAYLAB_HOME (~/.config/raylab by default):
    # a per-session one, so tests never create or use the user's key.
    os.environ.setdefault("RAYLAB_AUDIT_KEY", str(tmp_path_factory.mktemp("audit_key") / "audit-ed25519.pem"))
    yield home
    if old is None:
        os.environ.pop("RAYLAB_HOME", None)
    else:
        os.environ["RAYLAB_HOME"] = old


def run_cli(*args: str, cwd: Path | str = REPO, env: dict | None = None, timeout: float = 300):
    """Run `python -m raylab ARGS` in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "raylab", *args], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


def cli_here(*args: str, cwd: Path | str = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """`raylab ARGS` in this process (raylab.cli.main, as `python -m raylab` calls it), for a
    command that needs no process of its own (registry verbs, user errors refused before Ray):
    each subprocess costs a Python start and raylab's and MLflow's imports, about 4-5 s of a
    CI core. The same exit code and the same stdout/stderr (an unexpected exception is
    printed there with its traceback and exit 1, as in a subprocess). Each test file keeps at
    least one `run_cli` of the same kind, so the `python -m raylab` entry stays covered."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from raylab.cli import main

    saved = dict(os.environ)  # `env`, and what a command sets for itself (a stage's settings), end with it
    here = os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)  # as run_cli: relative paths (configs/...) are the repository's
        os.environ.update(env or {})
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(here)
        for k in set(os.environ) - set(saved):
            del os.environ[k]
        os.environ.update(saved)
    return subprocess.CompletedProcess(["raylab", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (random weights) and its tokenizer, saved like a user's local model."""
    from raylab import models as model

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = model.build_byte_tokenizer()
    lm = model.build_tiny_model("tiny-llama", tok, seed=123)
    tok.save_pretrained(path)
    lm.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def _session_ray():
    """The session's embedded Ray, with the dashboard (Ray's state API, which Ray Train's
    clean-up and the worker-kill test use), started by the first test that needs Ray."""
    import ray

    from raylab.core import cluster

    cluster.connect(None, state_api=True)
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_session_ray):
    """The embedded local Ray shared by the session (started on first use)."""
    from raylab.core import cluster

    return cluster.connect(None, state_api=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"port {port} did not open within {timeout_s}s")


def _wait_current_cluster(port: int, timeout_s: float = 60) -> None:
    """`auto` reads the address `ray start` records; it is written after the GCS is up."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip().endswith(f":{port}"):
            return
        time.sleep(0.3)
    raise RuntimeError(f"{path} did not name port {port} within {timeout_s}s")


# How Ray's client proxy reports failing to start a per-client server (intermittent on 2 cores).
RAY_CLIENT_FLAKE = ("Initialization failure from server", "Starting Ray client server failed")

# The head's Ray Client proxy waits this long for each session's server process to open its
# port (Ray's default is 30 s). On a busy 2-core machine that one Python process has been seen
# taking 37 s to start, and the session then failed ("Proxy failed to Connect to backend!").
# Not longer: a server process that dies at start-up (seen once, silently) is not noticed by
# the proxy, which waits the whole time before raylab's retry can start another.
CLIENT_PROXY_PATIENCE = {"RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "90"}


def ensure_auth_token() -> None:
    """`ray start` with token auth refuses to start without a token; only `ray.init` creates
    one (~/.ray/auth_token). Create it the same way when no earlier test has, so a head
    started first on a fresh machine works."""
    from raylab.core import cluster

    if cluster.auth_token() is None:
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with token auth; yields (gcs address, client address).
    The dashboard (Jobs API) listens on a free port too; see `ray_head.dashboard`."""
    with start_head() as addresses:
        yield addresses


@contextlib.contextmanager
def start_head(extra_env: dict | None = None, temp_dir: str | None = None):
    """The `ray_head` cluster; `temp_dir` keeps a second head's logs and recorded address
    (what `auto` joins) apart from the first's."""
    gcs, client, dashboard, agent, env_agent = (free_port() for _ in range(5))
    ensure_auth_token()
    # With the dashboard (and so the runtime-env agent) running, as on a real head.
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            f"--port={gcs}", f"--ray-client-server-port={client}", "--num-cpus=2",
            f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
            f"--runtime-env-agent-port={env_agent}", "--disable-usage-stats",
            *([f"--temp-dir={temp_dir}"] if temp_dir else []),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "token", **CLIENT_PROXY_PATIENCE, **(extra_env or {})},
    )
    try:
        _wait_port(gcs)
        _wait_port(client)
        _wait_port(dashboard)
        if temp_dir is None:
            _wait_current_cluster(gcs)
        yield f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}"
    finally:
        proc.send_signal(signal.SIGTERM)  # --block stops every process it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def two_node_cluster():
    """Two Ray nodes on one machine (2 CPUs each; the second has resource `node_b`),
    connected through raylab.cluster.connect. Replaces the session Ray for the rest of the
    session: its tests (marked `multinode`) run last, and share this one cluster across
    modules (test_multinode.py, test_train.py) rather than each starting two nodes anew."""
    import ray
    from ray.cluster_utils import Cluster

    from raylab.core import cluster as rl_cluster

    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # the session Ray's dashboard, now gone
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=2, resources={"node_b": 1})
    c.wait_for_nodes()
    rl_cluster.connect(None, address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


# ---------------------------------------------------------------- a learnable corpus (train, tune)

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
STEPS = 24


def base_config(out: Path, corpus: Path, **train_overrides) -> dict:
    return {
        "version": 1,
        "output_dir": str(out),
        "offline": True,
        "data": {"sources": [{"type": "jsonl", "path": str(corpus)}], "max_seq_len": 128, "val_fraction": 0.2,
                 "dedup": {"near": False}},
        "model": {"name_or_path": "preset:tiny-llama", "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.05}},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": STEPS, "eval_every": 12, "log_every": 4,
                  "warmup_ratio": 0.1, **train_overrides},
    }


@pytest.fixture(scope="session")
def learn_data(tmp_path_factory, _session_ray):
    """A corpus a tiny model visibly learns in a few steps, through the data stage once."""
    from raylab import config
    from raylab.data import run_data

    root = tmp_path_factory.mktemp("learn")
    corpus = root / "docs.jsonl"
    with corpus.open("w") as f:
        for i in range(120):
            c = COLORS[i % len(COLORS)]
            f.write(json.dumps({"text": f"Ticket {i}: the {c} widget is in stock. The {c} widget ships today."}) + "\n")
    out = root / "reference"
    run_data(config.load_dict(base_config(out, corpus)))
    return corpus, out


@pytest.fixture(scope="session")
def reference(learn_data):
    """The session's trained adapter: (config, meta) of a LoRA run on `learn_data` (its final/ is
    <output_dir>/train/final), trained once and shared by the train tests and the optimize tests
    that need a trained model (tests/integration/test_distill.py: the teacher)."""
    from raylab import config, train

    corpus, out = learn_data
    cfg = config.load_dict(base_config(out, corpus))
    return cfg, train.run_train(cfg)


def with_data(learn_data, out: Path, **train_overrides):
    """A config whose output_dir already holds the shared data-stage output."""
    import shutil

    from raylab import config

    corpus, ref = learn_data
    shutil.copytree(ref / "data", out / "data")
    return config.load_dict(base_config(out, corpus, **train_overrides))


@contextlib.contextmanager
def callers_sigint():
    """A SIGINT handler of the test's own in force for the block (yielded), the previous one back
    after it: an in-process run must leave the caller's handler as it found it."""
    def callers(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, callers)
    try:
        yield callers
    finally:
        signal.signal(signal.SIGINT, previous)


def kill_cli_when_ready(args: list[str], ready, timeout_s: float) -> None:
    """Run `python -m raylab ARGS --address <session Ray>` and SIGKILL its process group
    once `ready()` holds (fails if the command ends first)."""
    import ray

    proc = subprocess.Popen([sys.executable, "-m", "raylab", *args, "--address", ray.get_runtime_context().gcs_address],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, f"`raylab {args[0]}` finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
