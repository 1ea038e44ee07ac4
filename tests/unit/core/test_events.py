"""Events without Ray: one JSON line per state change in the run's file and the day's file
under $RAYLAB_HOME/events, whole lines when several processes append at once."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from raylab.core import events, runs


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYLAB_USER", "ada")
    return tmp_path / "home"


def test_an_event_lands_in_the_run_and_in_home(home, tmp_path):
    run = str(tmp_path / "run")
    record = events.emit("registry.promote", run=run, model="acme", version=3, reason="gates passed")
    assert set(record) == {"time", "kind", "actor", "actor_kind", "run", "model", "version", "fields"}
    assert record["actor"].startswith("ada@") and record["version"] == "3"
    (in_run,) = events.read(runs.Run(run).events)
    (in_home,) = events.read(str(next((home / "events").glob("*.jsonl"))))
    assert in_run == in_home == json.loads(json.dumps(record))
    assert in_run["fields"] == {"reason": "gates passed"}


def test_stage_records_start_and_end_or_failure(home, tmp_path):
    run = str(tmp_path / "run")
    with events.stage("data", run=run):
        pass
    with pytest.raises(ValueError, match="bad input"), events.stage("train", run=run):
        raise ValueError("bad input\nsecond line")
    kinds = [(e["kind"], e["fields"]["stage"]) for e in events.read(runs.Run(run).events)]
    assert kinds == [("stage.start", "data"), ("stage.end", "data"), ("stage.start", "train"), ("stage.failure", "train")]
    failure = events.read(runs.Run(run).events)[-1]["fields"]
    assert failure["error"] == "ValueError" and failure["message"] == "bad input"


def test_unknown_kinds_are_refused(home):
    with pytest.raises(ValueError, match="unknown event kind"):
        events.emit("stage.started")


def _emit_many(home: str, run: str, n: int) -> None:
    import os

    os.environ["RAYLAB_HOME"] = home
    for i in range(n):
        events.emit("stage.start", run=run, stage="data", i=i, padding="x" * 3000)


def test_concurrent_processes_append_whole_lines(home, tmp_path):
    run = str(tmp_path / "run")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_emit_many, args=(str(home), run, 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    lines = Path(runs.Run(run).events).read_text().splitlines()
    assert len(lines) == 100 and all(json.loads(line)["fields"]["padding"] == "x" * 3000 for line in lines)
