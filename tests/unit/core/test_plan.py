"""The resource plan: what each stage asks Ray for, and refusal when it cannot fit."""

from __future__ import annotations

import pytest

from raylab import config
from raylab.core import cluster
from raylab.core import plan as resource_plan
from raylab.core.plan import Node
from raylab.errors import UserError

BASE = {
    "version": 1,
    "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
    "model": {"name_or_path": "preset:tiny-llama"},
}
TUNE = {"search_space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}, "num_samples": 6}


def plan(overrides=(), nodes=(Node(4, 0),), cores=2, tune=False):
    raw = {**BASE, "tune": TUNE} if tune else BASE
    return resource_plan.make_plan(config.load_dict(raw, list(overrides)), list(nodes), cores=cores)


def test_quickstart_shape_fits_a_two_core_laptop():
    p = plan(tune=True)
    assert p.problems() == []
    train = next(a for a in p.asks if a.stage == "train")
    assert train.cpus == pytest.approx(1.25)  # one worker + a data ingest task
    assert p.trial_concurrency == 3  # (4 - 0.25 ingest) // (0.25 driver + 1 worker)
    assert p.trial_threads == 1  # a sweep: 2 cores shared by 3 concurrent trials' workers
    assert p.torch_threads == 2  # `raylab train` on the same config: its one worker has both cores


def test_a_train_runs_threads_come_from_its_own_workers_a_sweeps_from_its_trials():
    # The tune section must not change a plain train run's threads (it once gave 1 thread of 2).
    for workers in (1, 2):
        with_tune = plan([f"train.num_workers={workers}"], cores=8, tune=True)
        without = plan([f"train.num_workers={workers}"], cores=8)
        assert with_tune.torch_threads == without.torch_threads == 8 // workers
        assert without.trial_threads is None and without.trial_concurrency is None
        assert with_tune.trial_threads == max(1, 8 // (workers * with_tune.trial_concurrency))
    # Negative control: the trial figure really is smaller whenever trials run side by side.
    p = plan(cores=8, tune=True)
    assert p.trial_concurrency == 3 and p.trial_threads == 2 < p.torch_threads == 8
    # An explicit setting wins for both.
    p = plan(["train.torch_threads=3"], cores=8, tune=True)
    assert p.torch_threads == p.trial_threads == 3


def test_too_many_workers_names_the_numbers_and_the_fix():
    p = plan(["train.num_workers=4"])
    (problem,) = [x for x in p.problems() if x.startswith("train")]
    assert "needs 4.25 CPUs" in problem and "has 4 CPUs" in problem and "train.num_workers" in problem
    with pytest.raises(UserError, match="does not fit"):
        resource_plan.check_plan(p)


def test_worker_larger_than_any_node_is_refused_even_if_the_total_fits():
    p = plan(["train.cpus_per_worker=3"], nodes=[Node(2, 0), Node(2, 0)])
    assert any("one train worker needs 3 CPUs" in x and "largest node has 2 CPUs" in x for x in p.problems())


def test_gpus_requested_on_a_cpu_cluster():
    p = plan(["train.gpus_per_worker=1"])
    assert any("1 GPUs" in x and "0 GPUs" in x for x in p.problems())


def test_gpu_trials_are_limited_by_gpus():
    p = plan(["train.gpus_per_worker=1"], nodes=[Node(16, 2)], cores=16, tune=True)
    assert p.problems() == []
    assert p.trial_concurrency == 2


def test_max_concurrent_trials_caps_and_notes():
    assert plan(["tune.max_concurrent_trials=2"], tune=True).trial_concurrency == 2
    p = plan(["tune.max_concurrent_trials=5"], tune=True)
    assert p.trial_concurrency == 3
    assert any("only 3 trial(s) fit" in n for n in p.notes)


def test_explicit_torch_threads_win():
    assert plan(["train.torch_threads=3"]).torch_threads == 3


def test_serve_replicas_must_fit():
    p = plan(["serve.cpus_per_replica=8", "serve.autoscaling.max_replicas=2"])
    assert any(x.startswith("serve needs 8.1 CPUs") for x in p.problems()), p.problems()  # replica + ingress


def test_serve_rags_embedder_counts_beside_the_replicas():
    p = plan(["serve.cpus_per_replica=3.5", "serve.rag.cpus_per_replica=0.5"])  # on 4 CPUs
    assert any(x.startswith("serve needs 4.1 CPUs") for x in p.problems()), p.problems()  # replica + ingress + Embedder
    assert "1 embedder replica x 0.5 CPU" in p.render()
    assert not plan(["serve.cpus_per_replica=3.5"]).problems()  # the control: 3.6 CPUs fit without serve.rag


def test_render_says_whether_it_fits():
    assert "fits: yes" in plan().render()
    assert "fits: NO" in plan(["train.num_workers=9"]).render()


def test_embedded_capacity_defaults_to_more_logical_cpus_than_cores():
    cfg = config.load_dict(BASE)
    assert cluster.embedded_cpus(cfg) == max(4, 2 * cluster.physical_cores())
    assert cluster.embedded_cpus(config.load_dict(BASE, ["ray.num_cpus=6"])) == 6


def test_address_precedence(monkeypatch):
    cfg = config.load_dict(BASE, ["ray.address=auto"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.resolve_address(None, None) == (None, "embedded")
    assert cluster.resolve_address(None, cfg) == ("auto", "ray.address")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster.resolve_address(None, cfg) == ("10.0.0.1:6379", "RAY_ADDRESS")
    assert cluster.resolve_address("ray://h:10001", cfg) == ("ray://h:10001", "--address")
    assert cluster.mode_of("ray://h:10001") == "client" and cluster.mode_of("auto") == "cluster"


def test_process_env_is_explicit_about_auth_and_telemetry(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    env = cluster.process_env(config.load_dict(BASE, ["offline=true"]))
    monkeypatch.delenv("RAY_DATA_LOG_LEVEL", raising=False)
    monkeypatch.setenv("RAYLAB_HOME", "/srv/raylab")
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", "/srv/keys/audit.pem")  # the audit settings pass through too
    env = cluster.process_env(config.load_dict(BASE, ["offline=true"]))
    assert env == {
        "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_DATA_LOG_LEVEL": "WARNING",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAYLAB_HOME": "/srv/raylab", "RAYLAB_AUDIT_KEY": "/srv/keys/audit.pem",
    }
    governed = cluster.process_env(config.load_dict(BASE, ["governance.database=sqlite:////srv/raylab.db"]))
    assert governed["RAYLAB_DATABASE_URL"] == "sqlite:////srv/raylab.db"
    assert cluster.process_env(config.load_dict(BASE, ["ray.auth=disabled"]))["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "bogus")
    with pytest.raises(UserError, match="RAY_AUTH_MODE='bogus'"):
        cluster.process_env(None)


def test_a_ray_client_servers_traceback_is_cut_from_the_connection_error():
    """The Ray Client proxy can answer with its own traceback; the user sees its first words
    and the exception it ended in, never a traceback. The control: a plain message is kept."""
    from raylab.core.cluster import one_line

    server = ConnectionError("Initialization failure from server:\nTraceback (most recent call last):\n"
                             '  File "proxier.py", line 765, in Datapath\n    cmd = psutil_proc.cmdline()\n'
                             "psutil.ZombieProcess: PID still exists but it's a zombie (pid=28019)\n")
    assert one_line(server) == ("Initialization failure from server: psutil.ZombieProcess: PID still exists but "
                                "it's a zombie (pid=28019)")
    assert "Traceback" not in one_line(server)
    assert one_line(ConnectionError("no cluster at 127.0.0.1:6379")) == "no cluster at 127.0.0.1:6379"
