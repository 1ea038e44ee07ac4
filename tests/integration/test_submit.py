"""Jobs, Ray Client and S3 storage on a real two-node cluster started by `cluster/local.sh`
(a `ray start --head` node and one `ray start` worker node on loopback, token authentication
on), with an S3-compatible server (moto's server mode) on loopback as the shared storage:

- `ray job submit --working-dir . -- raylab run configs/quickstart.yaml ...` (the quickstart
  cut down by overrides) runs the pipeline end to end with `output_dir` and the registry's
  artifacts on S3: data, train with one worker on each node, gates, promotion, the endpoint on
  the cluster's Serve, its smoke requests and the base model's answers beside them;
- `raylab submit` tails the job's logs, re-uses the data stage's cache on S3, returns the
  entrypoint's exit code for a failed job (2 for a data problem), and stops the job on Ctrl-C;
- the jobs library API (`raylab.submit`, `raylab.core.jobs`) runs a config kept outside the
  working directory (it travels as YAML text) and reports status, logs and the run's events;
- a Ray Client session (`ray.init("ray://...")`) runs the data and train stages through the
  Python API;
- a fine-tuning job of the OpenAI-compatible service runs on the cluster from upload to a
  registered model that answers, as the remote provider of another raylab run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import ftapi
import pytest
from ftapi import BASE, chat_jsonl

from conftest import RAY_CLIENT_FLAKE, REPO, free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
TMP = os.environ.get("TMPDIR", "/tmp")
# pretrain=null: the pre-trained base is read from a filesystem path, and this run's output is
# on S3; so also the byte-level tiny preset at its byte-sized rows (the corpus tokenizer is
# part of the pretrain section). serve.rag=null: no retrieval index (its stage and the
# Embedder deployment, tens of seconds on 2 cores; the index on S3 is test_rag's subject).
# eval.bias_probes and eval.global_explanation=null: minutes of the gates' time on 2 shared
# cores (test_eval runs both on a real Ray and registry).
SMALL = ["pretrain=null", "serve.rag=null", "model.name_or_path=preset:tiny-llama", "data.max_seq_len=512", "tune=null", "train.max_steps=4",
         "train.eval_every=2", "train.epochs=1", "train.num_workers=2", "train.placement_strategy=SPREAD", "data.dedup.near=false", "eval.max_new_tokens=8", "eval.max_samples=3",
         "eval.bias_probes=null", "eval.global_explanation=null", "registry.model_name=job-e2e"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port with bucket `raylab`; yields the AWS_* env."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="raylab")
        yield env
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory, s3):
    """`cluster/local.sh start 1` with 2 CPUs per node, every node seeing the S3 server;
    yields (env, dashboard URL, Ray Client address).

    The head's job agent failed to come up once in CI with nothing to say why: its logs go
    into the failure, and into a warning when a second cluster is started in its place."""
    for attempt in (1, 2):
        env, url, client = _start_cluster(tmp_path_factory.mktemp("local-cluster"), s3)
        try:
            _wait_for_job_agent(url)
            break
        except AssertionError as e:
            report = f"{e}\n{_head_logs(env)}"
            _stop_cluster(env)
            if attempt == 2:
                pytest.fail(report)
            warnings.warn(f"cluster/local.sh started again: {report}", stacklevel=1)
    try:
        yield env, url, client
    finally:
        _stop_cluster(env)


def _start_cluster(state: Path, s3: dict) -> tuple[dict, str, str]:
    port, dashboard, client, agent = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, **s3, "PORT": str(port), "DASHBOARD_PORT": str(dashboard), "CLIENT_PORT": str(client),
           "AGENT_PORT": str(agent), "CPUS_PER_NODE": "2", "STATE_DIR": str(state),
           # the head's own Ray temp dir (short: Ray's socket paths must stay under 108 bytes)
           "TEMP_DIR": f"{TMP}/ray-{port}-node0",
           "RAY": str(BIN / "ray"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the session Ray's dashboard, not this cluster's
    start = subprocess.run(["bash", "cluster/local.sh", "start", "1"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=180)
    if start.returncode != 0:
        _stop_cluster(env)
        pytest.fail(start.stdout + start.stderr + _head_logs(env))
    assert f"RAY_ADDRESS=127.0.0.1:{port}" in start.stdout
    return env, f"http://127.0.0.1:{dashboard}", f"ray://127.0.0.1:{client}"


def _stop_cluster(env: dict) -> None:
    subprocess.run(["bash", "cluster/local.sh", "stop"], cwd=REPO, env=env, capture_output=True, timeout=120)
    assert not list(Path(env["STATE_DIR"]).glob("*.pid"))
    shutil.rmtree(env["TEMP_DIR"], ignore_errors=True)  # the head's (local.sh removes its workers')


def _head_logs(env: dict, lines: int = 30) -> str:
    """The tails of the head's dashboard, job and agent logs, and how many processes and
    threads this machine runs (a full process table starves Ray's agents)."""
    out = []
    for log in sorted(Path(env["TEMP_DIR"]).glob("session_latest/logs/*")):
        if log.name.startswith(("dashboard", "raylet.out", "gcs_server.out")) and log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
    threads = 0
    procs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    for p in procs:
        try:
            threads += len(list((p / "task").iterdir()))
        except OSError:
            pass
    out.append(f"--- {len(procs)} processes, {threads} threads on this machine")
    return "\n".join(out)


def _wait_for_job_agent(url: str, timeout_s: float = 120) -> None:
    """The head's job agent starts after the dashboard answers: run a trivial job first."""
    from raylab.core import jobs

    client = jobs.client(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job_id = client.submit_job(entrypoint="true")
            break
        except RuntimeError as e:
            assert time.monotonic() < deadline, f"the head's job agent did not start within {timeout_s:.0f} s: {e}"
            time.sleep(2)
    while str(client.get_job_status(job_id)) not in jobs.TERMINAL:
        assert time.monotonic() < deadline, "the trivial job did not finish"
        time.sleep(1)


@pytest.fixture(scope="module")
def quickstart_job(local_cluster, s3):
    """The cut-down quickstart submitted with `ray job submit`, its output on S3."""
    env, url, _ = local_cluster
    out = f"s3://raylab/runs/qs-{os.getpid()}"
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--",
         "raylab", "run", "configs/quickstart.yaml", *SMALL, f"output_dir={out}", f"serve.port={free_port()}",
         "registry.artifact_location=s3://raylab/mlflow"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return r, out


def test_ray_job_submit_runs_the_quickstart_on_two_nodes_with_s3_storage(quickstart_job, s3, monkeypatch):
    from pyarrow import fs

    from raylab.core import storage

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    r, out = quickstart_job
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads(storage.read_text(storage.join(out, "run.json")))
    assert list(summary["stages"]) == ["data", "train", "gates", "promote", "serve", "smoke", "explain"]
    assert summary["gates"] == "passed" and summary["promoted"] == summary["endpoint"]["version"]
    assert summary["smoke"] and all(isinstance(s["answer"], str) and "base_answer" in s for s in summary["smoke"])
    # eval.held_out's paraphrases (3 of them here), then one question of the training set
    assert [s["kind"] for s in summary["smoke"]] == ["held_out"] * 3 + ["seen"], summary["smoke"]
    assert summary["smoke"][0]["question"] == "How many days off do I get each year?"
    assert summary["held_out_rouge_l"]["questions"] == 3
    # the headline answer explained by the served version (prompt parts: the question and the template)
    explained = summary["explained"]
    assert explained["question"] == summary["smoke"][0]["question"] and explained["model"] == summary["promoted"]
    assert len(explained["top_tokens"]) == 5 and explained["parts"]["question"]["token_share"] > 0
    assert f"explained (feature_ablation, {summary['promoted']}" in r.stdout and "  top input tokens: " in r.stdout
    meta = json.loads(storage.read_text(storage.join(out, "train", "final", "raylab_train.json")))
    assert len(set(meta["worker_nodes"])) == 2  # SPREAD: one Train worker on each node
    for path in ("data/manifest.json", "config.resolved.yaml", "train/final/adapter_model.safetensors", "train/metrics.jsonl"):
        assert storage.exists(storage.join(out, path)), path
    manifest = json.loads(storage.read_text(storage.join(out, "data", "manifest.json")))
    assert all(p.startswith(out + "/data/") for p in manifest["outputs"].values())
    filesystem, root = storage.resolve(manifest["outputs"]["train"])
    shards = filesystem.get_file_info(fs.FileSelector(root))
    assert shards and all(f.path.endswith(".parquet") for f in shards)
    # The registered version's artifact lives under the registry's S3 artifact root.
    filesystem, root = storage.resolve("s3://raylab/mlflow")
    files = [f.path for f in filesystem.get_file_info(fs.FileSelector(root, recursive=True)) if f.type == fs.FileType.File]
    assert any(f.endswith("/model/adapter_model.safetensors") for f in files), files[:20]
    assert "=== summary ===" in r.stdout and "held out: not in the training data: How many days off" in r.stdout
    assert "recall of seen data: from the training set:" in r.stdout and "held-out ROUGE-L over 3 question(s)" in r.stdout
    assert re.search(r"promote: \S+ production (-|\d+) -> \d+", r.stdout), r.stdout  # the stage says what moved
    assert "data: 4/4 packed" in r.stdout  # the data stage's progress by phase
    # Every state change of the run is one event in its events file, written by one writer.
    from raylab.core import events, runs

    recorded = events.read(runs.Run(out).events)
    kinds = {(e["kind"], e["fields"].get("stage")) for e in recorded}
    for stage in ("run", "data", "train"):
        assert ("stage.start", stage) in kinds and ("stage.end", stage) in kinds, (stage, sorted(kinds))
    for kind in ("registry.register", "registry.gate", "registry.promote", "serve.start", "serve.stop"):
        assert kind in {k for k, _ in kinds}, (kind, sorted(kinds))
    assert all(e["run"] == out for e in recorded) and not any(e["kind"] == "stage.failure" for e in recorded)
    promoted = next(e for e in recorded if e["kind"] == "registry.promote")
    assert f"{promoted['model']}/{promoted['version']}" == summary["promoted"]


def test_raylab_submit_tails_logs_and_reuses_the_data_cache(local_cluster, quickstart_job):
    env, url, _ = local_cluster
    _, out = quickstart_job
    # --address wins over Ray's own RAY_ADDRESS / RAY_API_SERVER_ADDRESS (here: nothing listens there).
    elsewhere = {**env, "RAY_ADDRESS": "127.0.0.1:1", "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}
    r = subprocess.run([sys.executable, "-m", "raylab", "submit", "configs/quickstart.yaml", *SMALL, f"output_dir={out}",
                        "--until", "data", "--address", url], cwd=REPO, env=elsewhere, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "=== data ===" in r.stdout and "data: cache hit" in r.stdout and "SUCCEEDED" in r.stdout
    assert "carried env: AWS_ACCESS_KEY_ID, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, AWS_SECRET_ACCESS_KEY" in r.stdout


def test_raylab_submit_returns_the_failed_jobs_exit_code_and_refuses_a_wrong_token(local_cluster, tmp_path):
    env, url, _ = local_cluster
    r = subprocess.run(
        [sys.executable, "-m", "raylab", "submit", "configs/quickstart.yaml", *SMALL, f"output_dir={tmp_path / 'bad'}",
         f"data.sources.1.path={tmp_path / 'missing.jsonl'}", "--address", url],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-2000:]
    assert "no jsonl files at" in r.stdout and "FAILED (entrypoint exit code 2)" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    wrong = subprocess.run([sys.executable, "-m", "raylab", "submit", "configs/quickstart.yaml", "--address", url],
                           cwd=REPO, env={**env, "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr, wrong.stderr[-2000:]


def test_jobs_library_api_with_a_config_outside_the_working_dir(local_cluster, tmp_path):
    import yaml

    import raylab
    from conftest import base_config
    from raylab.core import jobs

    _, url, _ = local_cluster
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Ticket {i}: the widget ships today."}) + "\n" for i in range(24)))
    config_file = tmp_path / "elsewhere" / "tiny.yaml"  # not under the working directory (the repository)
    config_file.parent.mkdir()
    raw = {**base_config(tmp_path / "tiny-run", corpus), "registry": {"enabled": False}}
    config_file.write_text(yaml.safe_dump(raw))
    job_id = raylab.submit(str(config_file), address=url, working_dir=str(REPO), flags=["--until", "data"])
    final = jobs.wait(job_id, url, timeout_s=300)
    text = jobs.logs(job_id, url)
    assert final.status == "SUCCEEDED" and jobs.exit_code(final) == 0, text[-3000:]
    assert final.output_dir == str(tmp_path / "tiny-run") and final.run_name == "tiny-run"
    assert "=== data ===" in text
    assert jobs.client(url).get_job_info(job_id).entrypoint.startswith("python -m raylab run --config-env RAYLAB_JOB_CONFIG")
    kinds = {(e["kind"], e["fields"].get("stage")) for e in jobs.events(job_id, url)}
    assert {("stage.start", "data"), ("stage.end", "data")} <= kinds, sorted(kinds)
    # Negative control: the job validates the YAML it is sent (here made invalid after the
    # local check) and fails with the config's exit code, naming the flag.
    cfg = raylab.load_config(str(config_file), [f"output_dir={tmp_path / 'bad-run'}"])
    cmd, renv = jobs.job_spec(cfg, working_dir=str(REPO), flags=["--until", "data"])
    sent = yaml.safe_load(renv["env_vars"][jobs.CONFIG_ENV])
    sent["train"]["max_steps"] = -1
    renv["env_vars"][jobs.CONFIG_ENV] = yaml.safe_dump(sent)
    bad = jobs.client(url).submit_job(entrypoint=cmd, runtime_env=renv,
                                      metadata={"raylab_run": "bad-run", "raylab_output_dir": str(tmp_path / "bad-run")})
    failed = jobs.wait(bad, url, timeout_s=180)
    bad_text = jobs.logs(bad, url)
    assert failed.status == "FAILED" and jobs.exit_code(failed) == 2, bad_text[-3000:]
    assert "--config-env RAYLAB_JOB_CONFIG" in bad_text and "train.max_steps" in bad_text, bad_text[-3000:]
    assert jobs.events(bad, url) == []  # it stopped before any stage began


def test_ctrl_c_stops_the_job(local_cluster, tmp_path):
    env, url, _ = local_cluster
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "raylab", "submit", "configs/quickstart.yaml", *SMALL,
         f"output_dir={tmp_path / 'stopped'}", "--no-serve", "--address", url],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            if "=== data ===" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 130, text[-3000:]
    job_id = re.search(r"submitted job (\S+)", text).group(1)
    from raylab.core import jobs

    assert str(jobs.client(url).get_job_status(job_id)) == "STOPPED" and "stopping job" in text


RAY_CLIENT_SCRIPT = """
import json, sys
import ray
import raylab

ray.init(sys.argv[1])
print("CONNECTED", flush=True)
cfg = json.loads(sys.argv[2])
manifest = raylab.run_data(cfg)
meta = raylab.run_train(cfg)
print("RESULT " + json.dumps({"accepted": manifest["counts"]["accepted"], "metrics": meta["metrics"],
                              "client": ray.util.client.ray.is_connected()}))
"""


def _client_session(args: list[str], cwd: Path, env: dict) -> tuple[int, str]:
    """Run the Ray Client script (a user's own `ray.init("ray://...")`, so raylab's connect
    retry does not apply); Ray's client proxy failing to start a session's server (a known
    intermittent Ray problem on small machines: tests/conftest.py, RAY_CLIENT_FLAKE) is
    retried, and fails the test after 3 attempts: never a skip."""
    for _ in range(3):
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        out: list[str] = []
        timer = threading.Timer(120, proc.kill)  # until CONNECTED: the proxy hangs now and then
        timer.start()
        for line in proc.stdout:
            out.append(line)
            if line.startswith("CONNECTED"):
                timer.cancel()
        timer.cancel()
        proc.wait(600)
        text = "".join(out)
        if "CONNECTED" in text or not (proc.returncode == -signal.SIGKILL or any(f in text for f in RAY_CLIENT_FLAKE)):
            return proc.returncode, text
    pytest.fail(f"Ray's client proxy did not start a session in 3 attempts: {text[-3000:]}")


def test_ray_client_session_runs_data_and_train(local_cluster, learn_data, tmp_path):
    from conftest import base_config

    env, _, client = local_cluster
    corpus, _ = learn_data
    cfg = base_config(tmp_path / "client-run", corpus, max_steps=6, eval_every=3, num_workers=1)
    cfg["registry"] = {"enabled": False}
    rc, text = _client_session([sys.executable, "-c", RAY_CLIENT_SCRIPT, client, json.dumps(cfg)], tmp_path, env)
    assert rc == 0, text[-5000:]
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    assert result["client"] and result["accepted"] == 120
    assert result["metrics"]["val_loss"] < result["metrics"]["initial_val_loss"]
    assert (tmp_path / "client-run" / "train" / "final" / "raylab_train.json").exists()


# 4 LoRA steps, evaluated (and checkpointed) every 2, every step logged; a short evaluation
FT_SECTIONS = {"tune": None, "eval": {"max_samples": 3, "max_new_tokens": 8}}
FT_TRAIN = {"max_steps": 4, "eval_every": 2, "log_every": 1, "lr": 5e-3, "num_workers": 1}


def answer_loss(inf, examples: list[list[dict]]) -> float:
    """Mean cross-entropy of the assistant turns given the user turns, as the model renders them."""
    import torch

    from raylab import models

    losses = []
    for user, assistant in examples:
        prompt = models.prompt_ids(inf.tokenizer, {"messages": [user]})
        answer = inf.tokenizer(assistant["content"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = inf.model(input_ids=torch.tensor([prompt + answer]), labels=torch.tensor([[-100] * len(prompt) + answer]))
        losses.append(out.loss.item())
    return sum(losses) / len(losses)


def provider_side(client, svc, job_id: str) -> None:
    """The finished job as the fine-tuning service shows it: its events (validation, running,
    a metrics event per step, success naming the model), its checkpoints, and the registry
    version behind its fine_tuned_model, which loads, answers, and has learned from the upload
    (lower loss on its examples than the base it was trained from: the control)."""
    from raylab import config, models, registry
    from raylab.serve import ftstore

    job = client.fine_tuning.jobs.retrieve(job_id)
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in reversed(events)]  # oldest first
    assert messages[0].startswith("Validating training file") and "Job running" in messages, messages
    assert messages[-1].startswith(f"The job has successfully completed: {job.fine_tuned_model} is ")
    steps = sorted(e.data["step"] for e in events if e.type == "metrics")
    assert steps[-1] == 4 and {1, 2, 3}.issubset(steps)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints][0] == 4 and all(c.metrics.valid_loss for c in checkpoints)

    ref = svc.model_version(job.fine_tuned_model, None)  # the registry version behind the name
    assert ref
    row = ftstore.get_job(svc.db, "acme", job.id)
    run_cfg = config.load_dict({**ftapi.yaml_of(client.files.content(job.result_files[0]).content)})
    assert run_cfg.output_dir == row["output_dir"]
    store = registry.open_store(run_cfg)
    tuned, base = models.load(ref, store=store), models.load(ref, store=store, base=True)
    assert tuned.kind == "adapter"
    examples = [json.loads(line)["messages"] for line in chat_jsonl(24).decode().splitlines()[:4]]
    assert answer_loss(tuned, examples) < answer_loss(base, examples) - 0.05
    prompt = models.prompt_ids(tuned.tokenizer, {"messages": examples[0][:1]})
    assert len(models.greedy_ids(tuned.model, tuned.tokenizer, [prompt], 8)[0]) >= 1


def cancelled_while_running(client, svc, file_id: str, dashboard: str) -> None:
    """A second job cancelled once it runs: its Ray job is stopped, its state `cancelled`, and
    a cancelled job changes state no more (pause and resume are 400s)."""
    import openai

    from raylab.core import jobs
    from raylab.serve import ftstore

    job = client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="cancelled", method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}})
    deadline = time.monotonic() + 300
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status != "running":
        assert job.status == "queued" and time.monotonic() < deadline, (job.status, job.error)
        time.sleep(1)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    ray_job = ftstore.get_job(svc.db, "acme", job.id)["ray_job_id"]
    while (ray_state := jobs.status(ray_job, dashboard).status) not in jobs.TERMINAL:
        assert time.monotonic() < deadline, f"Ray job {ray_job} still {ray_state} after the cancel"
        time.sleep(1)
    assert ray_state == "STOPPED" and client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    for change in (client.fine_tuning.jobs.pause, client.fine_tuning.jobs.resume, client.fine_tuning.jobs.cancel):
        with pytest.raises(openai.BadRequestError):
            change(job.id)


def test_a_remote_provider_run_through_the_fine_tuning_api(local_cluster, tmp_path, monkeypatch):
    """train.provider openai_compatible against a second raylab (`raylab api --standalone`'s
    app on loopback, its jobs on this cluster) acting as the provider: `raylab run --no-serve`
    runs the data stage here, sends the accepted records of the source not marked
    contains_pii, follows the provider's job to `succeeded` (its metrics events become this
    run's metrics rows), registers a remote version whose card says what was sent and withheld,
    and gates it on the provider's validation loss. Without governance.allow_remote the same
    config is exit 2 and nothing reaches the provider.

    The provider's side of the same job is the fine-tuning service's whole path, driven by the
    official `openai` client (raylab's remote provider is one): files.create ->
    fine_tuning.jobs.create (`raylab run --no-serve` on the tiny preset: data, Ray Train,
    evaluation, registration) -> events until `succeeded`, a metrics event per step ->
    checkpoints.list -> the version behind `fine_tuned_model` loads and answers, having learned
    from the upload; a second job cancelled while running. One provider job serves both sides
    (each costs minutes of CI). The routing of an `ft:` name at the endpoint is
    tests/unit/serve/test_finetune_api.py's."""
    import openai
    import yaml

    from raylab import config, registry
    from raylab.core import events as events_
    from raylab.core import runs
    from raylab.errors import UserError

    env, dashboard, _ = local_cluster
    (tmp_path / "provider").mkdir()
    provider_cfg = ftapi.template(tmp_path / "provider", sections={**FT_SECTIONS, "train": FT_TRAIN}, address=dashboard)
    app, users = ftapi.make_app(tmp_path / "provider", monkeypatch, provider_cfg)
    key = users["ada"]["Authorization"].split()[1]
    (tmp_path / "public.jsonl").write_bytes(chat_jsonl(24))
    (tmp_path / "crm.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Which address does customer {i} ship to?"},
        {"role": "assistant", "content": f"Customer {i} ships to Larchmere Row {i}."}]}) + "\n" for i in range(6)))
    out = tmp_path / "local-run"
    raw = {"version": 1, "output_dir": str(out), "offline": True,
           "data": {"format": "chat", "val_fraction": 0.25, "dedup": {"near": False},
                    "sources": [{"type": "jsonl", "path": str(tmp_path / "public.jsonl"), "name": "public"},
                                {"type": "jsonl", "path": str(tmp_path / "crm.jsonl"), "name": "crm", "contains_pii": True}]},
           "model": {"name_or_path": BASE},
           "train": {"provider": "openai_compatible", "log_every": 1,
                     "remote": {"base_url": "${env:PROVIDER_URL}", "api_key": "${env:PROVIDER_KEY}", "model": BASE,
                                "suffix": "remote", "poll_s": 1}},
           "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'local-mlflow.db'}", "model_name": "acme-remote",
                        "gates": {"max_val_loss": 50.0}, "auto_promote": True},
           "eval": {"bias_probes": None, "global_explanation": None},
           "governance": {"allow_remote": True}}
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump(raw))
    try:
        with ftapi.loopback(app) as url:
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
            local_env = {**env, "PROVIDER_URL": url, "PROVIDER_KEY": key,
                         "RAYLAB_DATABASE_URL": f"sqlite:///{tmp_path / 'local-control.db'}"}
            # allow_remote false (the default): exit 2 naming it, before the data stage, and
            # nothing reaches the provider
            refused = subprocess.run([str(BIN / "raylab"), "run", str(tmp_path / "remote.yaml"), "--no-serve",
                                      "governance.allow_remote=false", "--address", f"127.0.0.1:{env['PORT']}"],
                                     env=local_env, capture_output=True, text=True, timeout=120)
            assert refused.returncode == 2 and "governance.allow_remote" in refused.stderr, refused.stderr[-2000:]
            assert client.files.list().data == [] and not out.exists()

            done = subprocess.run([str(BIN / "raylab"), "run", str(tmp_path / "remote.yaml"), "--no-serve",
                                   "--address", f"127.0.0.1:{env['PORT']}"],
                                  env=local_env, capture_output=True, text=True, timeout=900)
            text = done.stdout + done.stderr
            assert done.returncode == 0, text[-4000:]
            jobs_ = client.fine_tuning.jobs.list().data
            assert len(jobs_) == 1 and jobs_[0].status == "succeeded", jobs_
            job = jobs_[0]
            assert job.fine_tuned_model == f"ft:{BASE}:acme:remote:{job.id}"
            assert f"remote: job {job.id} created" in text and re.search(r"remote: sent \d+ train and \d+ val records", text)
            # what reached the provider: the public source's records only, both splits
            uploads = [f for f in client.files.list().data if f.purpose == "fine-tune"]  # not the job's result file
            assert sorted(f.filename for f in uploads) == ["local-run-train.jsonl", "local-run-val.jsonl"]
            sent = b"".join(client.files.content(f.id).content for f in uploads)
            assert b"Larchmere" not in sent and sent.count(b'"messages"') == 24, sent[:500]
            assert b"Larchmere" in (tmp_path / "crm.jsonl").read_bytes()  # the control: the marker is in the source
            # the same config again: the finished job is reused, nothing is sent twice
            again = subprocess.run([str(BIN / "raylab"), "train", str(tmp_path / "remote.yaml"), "--address",
                                    f"127.0.0.1:{env['PORT']}"], env=local_env, capture_output=True, text=True, timeout=300)
            assert again.returncode == 0 and f"remote job {job.id} finished already" in again.stdout + again.stderr, \
                (again.stdout + again.stderr)[-3000:]
            assert len(client.fine_tuning.jobs.list().data) == 1
            assert len([f for f in client.files.list().data if f.purpose == "fine-tune"]) == 2
            provider_side(client, app.state.ingress.ftapi, job.id)
            train_file = next(f.id for f in uploads if f.filename == "local-run-train.jsonl")  # files.list's order is not the upload order
            cancelled_while_running(client, app.state.ingress.ftapi, train_file, dashboard)
    finally:
        from raylab.core import controldb

        controldb.dispose_all()
    cfg = config.load(str(tmp_path / "remote.yaml"))
    store = registry.open_store(cfg)
    mv = registry.get_version(store, "acme-remote/1")
    assert registry.remote_of(mv) == {"provider": "openai_compatible", "base_url": url,
                                      "model": job.fine_tuned_model, "job": job.id}
    assert mv.tags["raylab.gates.status"] == "passed", mv.tags.get("raylab.gates.failures")
    report = json.loads(mv.tags["raylab.gates.report"])
    assert report["checks"][0]["source"] == "the provider's validation loss" and report["val_loss"] is not None
    assert {k: int(v) for k, v in store.client.get_registered_model("acme-remote").aliases.items()} == {"production": 1}
    card = registry.render_card(registry.card_for(store, mv))
    assert "## Remote provider" in card and "Withheld (sources marked contains_pii): crm (6)" in card
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["step"]] == [1, 2, 3, 4] and any(r.get("evaluated") for r in rows)
    kinds = [e["kind"] for e in events_.read(runs.Run(str(out)).events)]
    assert "train.remote_upload" in kinds and "train.remote_job" in kinds
    with pytest.raises(UserError, match="its weights stay there"):
        registry.fetch(store, "acme-remote/1")
