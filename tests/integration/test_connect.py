"""Ray connection modes and `raylab doctor` against real Ray (embedded, ray start, client)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import RAY_CLIENT_FLAKE, REPO, run_cli

pytestmark = pytest.mark.integration


def test_embedded_ray_is_explicit_about_auth_and_capacity(ray_local):
    import ray

    from raylab.core import cluster

    assert ray_local.mode == "embedded" and ray_local.auth == "token"
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert ray.cluster_resources()["CPU"] == cluster.embedded_cpus(None)

    @ray.remote(num_cpus=0.25)
    def env_of_worker():
        return {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "RAY_AUTH_MODE")}

    # Workers get the same explicit environment as the driver.
    assert ray.get(env_of_worker.remote()) == {
        "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "token",
    }
    assert cluster.connect(None).mode == "embedded"  # idempotent


def test_doctor_embedded_with_config():
    proc = run_cli("doctor", "configs/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = proc.stdout
    for needle in ("ray 2.60", "torch ", "transformers ", "peft ", "cores: ", "torch threads", "GPUs: ",
                   "ray: embedded", "auth token", "node 0:", "resource plan:", "fits: yes",
                   "LlamaForCausalLM", "fingerprint"):
        assert needle in out, (needle, out)


def test_doctor_refuses_a_plan_that_does_not_fit_the_cluster():
    proc = run_cli("doctor", "configs/quickstart.yaml", "train.num_workers=9", "train.cpus_per_worker=1")
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "fits: NO" in proc.stdout and "train needs 9.25 CPUs" in proc.stdout


def test_prepare_refuses_before_starting_ray(tmp_path):
    """A stage's first call: an embedded plan that cannot fit never starts Ray."""
    code = textwrap.dedent("""\
        import ray
        from raylab import config
        from raylab.core import cluster
        from raylab.core import plan
        from raylab.errors import UserError
        cfg = config.load("configs/quickstart.yaml", ["train.num_workers=16", "train.cpus_per_worker=1"])
        try:
            plan.prepare(cfg)
        except UserError as e:
            print("refused:", str(e).splitlines()[1].strip())
        print("ray started:", ray.is_initialized())
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused: train needs 16.25 CPUs" in proc.stdout
    assert "ray started: False" in proc.stdout


def test_doctor_auto_joins_a_ray_start_cluster(ray_head):
    gcs, _ = ray_head
    proc = run_cli("doctor", "--address", "auto", env={"RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "ray: cluster (address auto, from --address), auth token" in proc.stdout
    assert "2 CPU" in proc.stdout


def test_explicit_address_with_token_auth(ray_head):
    gcs, _ = ray_head
    # RAY_AUTH_MODE unset in the caller: raylab still makes token mode explicit, which is
    # what joining a token-auth cluster by address needs (RAY_NOTES.md).
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([sys.executable, "-m", "raylab", "doctor", "--address", gcs], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"address {gcs}, from --address" in proc.stdout


def test_ray_address_env_and_config_precedence(ray_head, tmp_path):
    gcs, _ = ray_head
    proc = run_cli("doctor", "configs/quickstart.yaml", "ray.address=127.0.0.1:1", env={"RAY_ADDRESS": gcs})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "from RAY_ADDRESS" in proc.stdout


def test_doctor_through_ray_client(ray_head):
    """Ray's client proxy intermittently fails or hangs starting its per-client server on
    this 2-core machine (seen in about half the runs; its logs show no error). That is
    skipped with the reason; any error of raylab's own still fails the test."""
    _, client = ray_head
    try:
        proc = run_cli("doctor", "configs/quickstart.yaml", "--address", client, env={"RAY_ADDRESS": ""}, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("Ray Client session did not start within 120 s (Ray's client proxy, not raylab)")
    if proc.returncode != 0 and any(flake in proc.stderr for flake in RAY_CLIENT_FLAKE):
        pytest.skip("Ray's client proxy failed to start the per-client server: " + proc.stderr.splitlines()[0][:200])
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"ray: client (address {client}" in proc.stdout
    assert "fits: yes" in proc.stdout


def test_missing_token_is_a_clear_user_error(ray_head, tmp_path):
    gcs, _ = ray_head
    env = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "absent-token"), "RAY_ADDRESS": ""}
    proc = run_cli("doctor", "--address", gcs, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "token authentication is on but no token was found" in proc.stderr


def test_auto_without_a_recorded_cluster_is_a_fast_user_error(tmp_path):
    proc = run_cli("doctor", "--address", "auto", env={"RAY_ADDRESS": "", "RAY_TMPDIR": str(tmp_path)}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no cluster was started on this machine" in proc.stderr


def test_nothing_listening_is_a_fast_user_error():
    from conftest import free_port

    proc = run_cli("doctor", "--address", f"127.0.0.1:{free_port()}", env={"RAY_ADDRESS": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nothing answers at 127.0.0.1" in proc.stderr
    proc = run_cli("doctor", "--address", "not-an-address", env={"RAY_ADDRESS": ""})
    assert proc.returncode == 2 and "expected auto, HOST:PORT or ray://HOST:PORT" in proc.stderr
