"""Unit tests (no Ray cluster): `train.loss_on: all`, the pretrain stage's derived config
and base resolution, and `raylab submit`'s argument checks, runtime_env and exit codes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, run_cli


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
    with pytest.raises(UserError, match="no pre-trained base"):
        pretrain.resolve(cfg)
    final = tmp_path / "qs" / "pretrain" / "train" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    resolved = pretrain.resolve(cfg)
    assert resolved.model.name_or_path == str(final) and resolved.pretrain is None
    assert resolved.train == cfg.train and resolved.tune == cfg.tune
    no_pretrain = config.load(REPO / "configs" / "quickstart.yaml", ["pretrain=null"])
    assert pretrain.resolve(no_pretrain) is no_pretrain


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
        r = run_cli("submit", *args, "output_dir=" + str(tmp_path / "out"), timeout=60,
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

