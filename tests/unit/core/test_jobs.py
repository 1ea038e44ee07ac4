"""Unit tests (no Ray cluster): `train.loss_on: all`, the pretrain stage's derived config
and base resolution, and `raylab submit`'s argument checks, runtime_env and exit codes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, cli_here
from raylab.errors import UserError


def test_collate_all_tokens_targets_every_document_token_but_the_first():
    from raylab.train.loop import collate
    from raylab.train.loss import IGNORE

    # Two documents packed in one row, then padding.
    batch = {"input_ids": np.array([[5, 6, 7, 8, 9, 0, 0]], dtype=np.int32),
             "labels": np.array([[IGNORE, IGNORE, 7, IGNORE, 9, IGNORE, IGNORE]], dtype=np.int32),
             "segment_ids": np.array([[1, 1, 1, 2, 2, 0, 0]], dtype=np.int32),
             "position_ids": np.array([[0, 1, 2, 0, 1, 0, 0]], dtype=np.int32)}
    assert collate(batch)["labels"].tolist() == [[IGNORE, IGNORE, 7, IGNORE, 9, IGNORE, IGNORE]]
    assert collate(batch, all_tokens=True)["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE]]


def test_pretrain_config_and_resolution(tmp_path):
    from raylab import config
    from raylab.errors import UserError
    from raylab.train import pretrain

    cfg = config.load(REPO / "configs" / "quickstart.yaml", [f"output_dir={tmp_path / 'qs'}"])
    assert cfg.pretrain is not None
    p = pretrain.pretrain_config(cfg)
    assert p.output_dir == str(tmp_path / "qs" / "pretrain") and p.model.method == "full"
    assert p.train.loss_on == "all" and p.train.max_steps == cfg.pretrain.max_steps and p.train.lr == cfg.pretrain.lr
    assert p.tune is None and p.pretrain is None and not p.registry.enabled
    assert pretrain.missing(cfg)  # so `raylab train` / `raylab tune` pre-train first
    with pytest.raises(UserError, match="no pre-trained base"):
        pretrain.resolve(cfg)
    final = tmp_path / "qs" / "pretrain" / "train" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    assert not pretrain.missing(cfg)
    resolved = pretrain.resolve(cfg)
    assert resolved.model.name_or_path == str(final) and resolved.pretrain is None
    assert resolved.train == cfg.train and resolved.tune == cfg.tune
    no_pretrain = config.load(REPO / "configs" / "quickstart.yaml", ["pretrain=null"])
    assert pretrain.resolve(no_pretrain) is no_pretrain and not pretrain.missing(no_pretrain)


def test_submit_argument_errors_exit_2_before_submitting(tmp_path):
    qs = "configs/quickstart.yaml"
    for args, message in [
        ((qs,), "--address is required"),
        ((qs, "--address", "127.0.0.1:6379"), "jobs go to the Ray dashboard"),
        ((qs, "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path)), "outside the working directory"),
        ((qs, "--address", "http://127.0.0.1:9", "--env", "RAYLAB_TEST_UNSET_VAR"), "not set here"),
        ((qs, "--address", "http://127.0.0.1:9", "--env", "1BAD=x"), "expected NAME or NAME=VALUE"),
        ((qs, "--address", "http://127.0.0.1:9"), "no Ray dashboard answers"),
        ((qs, "train.lr=-1", "--address", "http://127.0.0.1:9"), "train.lr"),
    ]:
        # No cluster address from the environment (an earlier test's Ray may have left one).
        r = cli_here("submit", *args, "output_dir=" + str(tmp_path / "out"),
                     env={"RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": ""})
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_submit_runtime_env_carries_package_and_env(tmp_path, monkeypatch):
    from raylab import config
    from raylab.core import jobs

    for name in jobs.CARRIED:
        monkeypatch.delenv(name, raising=False)  # whatever this test session set before
    monkeypatch.setenv("ACME_DB_URL", "postgresql://x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("EXTRA", "1")
    raw = config.load(REPO / "configs" / "quickstart.yaml").model_dump(mode="json")
    raw["data"]["sources"].append({"type": "sql", "url": "${env:ACME_DB_URL}", "query": "select 1 as text"})
    cfg = config.load_dict(raw)
    inside = jobs.runtime_env(cfg, str(REPO), ["EXTRA", "MODE=fast"])
    assert inside["working_dir"] == str(REPO) and "py_modules" not in inside  # raylab/ is in the working dir
    assert inside["env_vars"] == {"ACME_DB_URL": "postgresql://x", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                  "EXTRA": "1", "MODE": "fast"}
    elsewhere = jobs.runtime_env(cfg, str(tmp_path), [])
    assert elsewhere["py_modules"] == [str(REPO / "raylab")]
    cmd = jobs.entrypoint(str(REPO / "configs" / "quickstart.yaml"), str(REPO), ["train.lr=1e-3", "x=a b"], ["--no-serve"])
    assert cmd == "python -m raylab run configs/quickstart.yaml train.lr=1e-3 'x=a b' --no-serve"


@pytest.mark.parametrize("status,code,expected", [
    ("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", 1, 1), ("FAILED", None, 1), ("STOPPED", None, 1)])
def test_submit_exit_code_follows_the_job(status, code, expected):
    from raylab.core import jobs

    info = SimpleNamespace(status=status, driver_exit_code=code, message="m", metadata=None)
    job = jobs.JobStatus.from_info("raylab-x", info)
    lines = [jobs.summary(job)]  # the line `raylab submit` logs last
    assert jobs.exit_code(job) == expected
    assert status in lines[-1] and (code is None or str(code) in lines[-1] or status == "SUCCEEDED")



class FakeJobs:
    """JobSubmissionClient's surface that core.jobs uses, recording what it is sent."""

    def __init__(self, statuses=("SUCCEEDED",), exit_code=0, metadata=None):
        self.submitted: list[dict] = []
        self.statuses = list(statuses)
        self.exit_code, self.metadata = exit_code, metadata

    def submit_job(self, **job):
        self.submitted.append(job)
        self.metadata = job["metadata"]
        return job["submission_id"]

    def get_job_info(self, job_id):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(status=status, driver_exit_code=self.exit_code if status in ("SUCCEEDED", "FAILED") else None,
                               message="m", metadata=self.metadata)


def test_a_config_outside_the_working_dir_travels_as_yaml_in_the_jobs_env(tmp_path, monkeypatch):
    from raylab import config
    from raylab.core import jobs

    outside = tmp_path / "elsewhere" / "tiny.yaml"
    outside.parent.mkdir()
    outside.write_text((REPO / "configs" / "quickstart.yaml").read_text())
    cfg = config.load(outside, [f"output_dir={tmp_path / 'out'}", "train.lr=1e-3"])
    fake = FakeJobs()
    monkeypatch.setattr(jobs, "client", lambda url: fake)
    job_id = jobs.submit(cfg, "http://127.0.0.1:9", path=outside, overrides=[f"output_dir={tmp_path / 'out'}"],
                         working_dir=str(REPO), flags=["--until", "data"])
    [sent] = fake.submitted
    assert job_id == sent["submission_id"] and job_id.startswith("raylab-out-")
    assert sent["entrypoint"] == "python -m raylab run --config-env RAYLAB_JOB_CONFIG --until data"
    assert sent["metadata"] == {"raylab_run": "out", "raylab_output_dir": str(tmp_path / "out")}
    assert sent["runtime_env"]["working_dir"] == str(REPO)
    # The job validates the same config it was sent: overrides applied, output_dir the same.
    travelled = config.load_text(sent["runtime_env"]["env_vars"]["RAYLAB_JOB_CONFIG"], source="--config-env X")
    assert travelled.model_dump() == cfg.model_dump() and travelled.train.lr == 1e-3
    # A config object (no file) travels the same way.
    cmd, renv = jobs.job_spec(cfg, working_dir=str(REPO), flags=["--no-serve"])
    assert cmd == "python -m raylab run --config-env RAYLAB_JOB_CONFIG --no-serve" and jobs.CONFIG_ENV in renv["env_vars"]
    # Negative control: a file inside the working directory is re-read there, nothing in the env.
    inside = REPO / "configs" / "quickstart.yaml"
    cmd, renv = jobs.job_spec(config.load(inside, ["train.lr=1e-3"]), path=inside, overrides=["train.lr=1e-3"],
                              working_dir=str(REPO), flags=["--until", "data"])
    assert cmd == "python -m raylab run configs/quickstart.yaml train.lr=1e-3 --until data"
    assert jobs.CONFIG_ENV not in renv["env_vars"]


def test_run_config_env_validates_like_a_file_and_names_the_flag(tmp_path):
    from raylab import config

    qs = (REPO / "configs" / "quickstart.yaml").read_text()
    # The same text from the environment gives the same config as the file.
    assert config.load_text(qs, ["train.lr=1e-3"]).model_dump() == \
        config.load(REPO / "configs" / "quickstart.yaml", ["train.lr=1e-3"]).model_dump()
    for text, message in [("data: [1, 2\n", "--config-env RAYLAB_T:"), ("", "$RAYLAB_T is not set"),
                          (qs.replace("  max_steps: 600", "  max_steps: -600", 1), "pretrain.max_steps")]:
        r = cli_here("run", "--config-env", "RAYLAB_T", "--until", "data", f"output_dir={tmp_path / 'o'}",
                     env={"RAYLAB_T": text})
        assert r.returncode == 2, (text[:40], r.stdout[-2000:], r.stderr[-2000:])
        assert message in r.stderr and "--config-env RAYLAB_T" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_status_wait_and_events_of_a_job(tmp_path, monkeypatch):
    from raylab.core import events, jobs

    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    out = str(tmp_path / "run")
    with events.stage("data", run=out):
        pass
    fake = FakeJobs(statuses=["PENDING", "RUNNING", "FAILED"], exit_code=2,
                    metadata={"raylab_run": "run", "raylab_output_dir": out})
    monkeypatch.setattr(jobs, "client", lambda url: fake)
    first = jobs.status("raylab-run-1", "http://127.0.0.1:9")
    assert first == jobs.JobStatus("raylab-run-1", "PENDING", None, "m", "run", out) and not first.terminal
    assert jobs.exit_code(first) == 1
    final = jobs.wait("raylab-run-1", "http://127.0.0.1:9", timeout_s=30, poll_s=0.01)
    assert final.status == "FAILED" and final.driver_exit_code == 2 and jobs.exit_code(final) == 2
    assert "FAILED (entrypoint exit code 2)" in jobs.summary(final)
    assert [(e["kind"], e["fields"]["stage"]) for e in jobs.events("raylab-run-1", "http://127.0.0.1:9")] == \
        [("stage.start", "data"), ("stage.end", "data")]
    stuck = FakeJobs(statuses=["RUNNING"], metadata={})
    monkeypatch.setattr(jobs, "client", lambda url: stuck)
    with pytest.raises(TimeoutError, match="still RUNNING"):
        jobs.wait("raylab-x", "http://127.0.0.1:9", timeout_s=0.05, poll_s=0.01)
    with pytest.raises(UserError, match="not submitted by raylab"):
        jobs.events("raylab-x", "http://127.0.0.1:9")


def test_raylab_submit_takes_a_path_without_overrides(tmp_path, monkeypatch):
    import raylab
    from raylab.core import jobs

    fake = FakeJobs()
    monkeypatch.setattr(jobs, "client", lambda url: fake)
    inside = raylab.submit("configs/quickstart.yaml", address="http://127.0.0.1:9", working_dir=str(REPO))
    outside = tmp_path / "q.yaml"
    outside.write_text((REPO / "configs" / "quickstart.yaml").read_text())
    elsewhere = raylab.submit(str(outside), ["train.lr=1e-3"], address="http://127.0.0.1:9", working_dir=str(REPO))
    first, second = fake.submitted
    assert (first["submission_id"], second["submission_id"]) == (inside, elsewhere)
    assert first["entrypoint"] == "python -m raylab run configs/quickstart.yaml"
    assert second["entrypoint"] == "python -m raylab run --config-env RAYLAB_JOB_CONFIG"
    assert "lr: 0.001" in second["runtime_env"]["env_vars"]["RAYLAB_JOB_CONFIG"]
