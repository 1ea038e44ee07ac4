"""A fine-tuning job's progress from a real training run: `metrics` events per logged step and
`ftckpt_` checkpoints (serve/finetune.py) read from what Ray Train wrote.

The session's trained adapter (conftest `reference`: 24 LoRA steps on Ray Train, logged every
4, evaluated and checkpointed every 12) is copied in as a job's run directory, the job is put
in `running` (the Ray job itself is test_submit's subject), and the official `openai` client
reads its events and checkpoints from the standalone app on a loopback server.

    pytest -m integration tests/integration/test_finetune_progress.py
"""

from __future__ import annotations

import json
import shutil

import ftapi
import pytest
from fastapi.testclient import TestClient
from ftapi import BASE, chat_jsonl

pytestmark = pytest.mark.integration

app_env = ftapi.app_env


@pytest.fixture
def served(app_env):
    app, users, _ = app_env
    with ftapi.loopback(app) as url:
        yield app, users, url


def test_metrics_events_and_checkpoints_come_from_the_run(served, reference):
    import openai

    from raylab.core import runs
    from raylab.serve import ftstore

    app, users, base_url = served
    cfg, _ = reference
    client = openai.OpenAI(base_url=base_url, api_key=users["ada"]["Authorization"].split()[1], max_retries=0)
    f = client.files.create(file=("train.jsonl", chat_jsonl(12)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="widgets")
    svc = app.state.ingress.ftapi
    row = ftstore.get_job(svc.db, "acme", job.id)
    # before the run has trained: no metrics and no checkpoints (the control for what follows)
    assert [e for e in client.fine_tuning.jobs.list_events(job.id) if e.type == "metrics"] == []
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []
    shutil.copytree(runs.Run(cfg.output_dir).train, runs.Run(row["output_dir"]).train)
    ftstore.update_job(svc.db, job.id, status="running", error=None, finished_at=None)

    logged = [json.loads(line) for line in open(runs.Run(cfg.output_dir).train_metrics)]
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = sorted((e for e in events if e.type == "metrics"), key=lambda e: e.data["step"])
    assert [e.data["step"] for e in metrics] == [m["step"] for m in logged] and len(metrics) >= 6
    for e, m in zip(metrics, logged, strict=True):
        if m["loss"] is None or m["loss"] != m["loss"]:  # step 0: the evaluation before any training step
            assert e.data["train_loss"] is None and e.message.startswith(f"Step {m['step']}, validation loss=")
        else:
            assert e.data["train_loss"] == pytest.approx(m["loss"]) and e.message.startswith(f"Step {m['step']}: ")
        assert ("valid_loss" in e.data) == bool(m["evaluated"])
    # read again (and by a second reader): each step once
    TestClient(app).get(f"/v1/fine_tuning/jobs/{job.id}/events", headers=users["ada"])
    again = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert len(again) == len(metrics)

    page = client.fine_tuning.jobs.checkpoints.list(job.id)
    steps = [c.step_number for c in page.data]
    assert steps == sorted(steps, reverse=True) and steps[0] == 24 and 12 in steps  # newest first
    newest = page.data[0]
    assert newest.id.startswith("ftckpt_") and newest.fine_tuning_job_id == job.id
    assert newest.fine_tuned_model_checkpoint == f"ft:{BASE}:acme:widgets:{job.id}:ckpt-step-24"
    assert newest.metrics.step == 24 and newest.metrics.train_loss == pytest.approx(logged[-1]["loss"])
    assert newest.metrics.valid_loss == pytest.approx(logged[-1]["val_loss"])
    second = client.fine_tuning.jobs.checkpoints.list(job.id, after=newest.id, limit=1)
    assert [c.step_number for c in second.data] == [steps[1]]
    assert [c.id for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [c.id for c in page.data]  # stable

    # another organisation sees neither the job's events nor its checkpoints
    other = openai.OpenAI(base_url=base_url, api_key=users["bob"]["Authorization"].split()[1], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.checkpoints.list(job.id)
