"""Live tracking on a real MLflow store (SQLite): the train driver's MLflow run exists before
the first metric, rows arrive in batches as metrics.jsonl grows (each step once), a driver
that died is continued by the next one, and the run ends as the run logged at the end with
no step twice; system metrics with psutil."""

from __future__ import annotations

import json
import time

import pytest

from raylab import registry
from raylab.core import runs
from registry_helpers import cfg_for, open_test_store


@pytest.fixture
def store(tmp_path, monkeypatch):
    return open_test_store(tmp_path, monkeypatch)


def write_rows(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(step: int, loss: float | None = None, evaluated: bool = False) -> dict:
    out = {"step": step, "time": time.time(), "lr": 1e-3, "evaluated": evaluated}
    if loss is not None:
        out["loss"] = loss
    if evaluated:
        out["val_loss"] = 3.0 - step / 10
    return out


def steps(store, run_id: str, key: str) -> list[int]:
    return [m.step for m in store.client.get_metric_history(run_id, key)]


def test_the_run_opens_first_then_rows_stream_in_batches_once_each(store, tmp_path):
    cfg = cfg_for(tmp_path, live_interval_s=0, system_metrics=False)
    live = registry.open_train_run(cfg, "ident1")
    run = store.client.get_run(live.run_id)
    assert run.info.status == "RUNNING" and run.data.params["train.lr"] == str(cfg.train.lr)  # before any metric
    assert run.data.metrics == {}
    metrics = tmp_path / "run" / "train" / "metrics.jsonl"
    assert metrics.as_posix() == runs.Run(cfg.output_dir).train_metrics
    history = [row(0, evaluated=True), row(2, 2.9), row(4, 2.7, evaluated=True)]
    write_rows(metrics, history[:2])
    assert live.poll(str(metrics)) == 2
    assert steps(store, live.run_id, "loss") == [2] and steps(store, live.run_id, "val_loss") == [0]
    assert live.poll(str(metrics)) == 0  # nothing new: nothing logged twice
    write_rows(metrics, history)
    metrics.write_text(metrics.read_text() + '{"step": 6, "lo')  # a row being written: left for next time
    assert live.poll(str(metrics)) == 1
    assert steps(store, live.run_id, "loss") == [2, 4] and steps(store, live.run_id, "val_loss") == [0, 4]
    assert store.client.get_run(live.run_id).data.tags["raylab.live_step"] == "4"
    live.stop()
    # The end of the run: the same MLflow run, the remaining rows, no step twice.
    history.append(row(6, 2.5, evaluated=True))
    exp = registry.experiment_id(store, "widgets")
    run_id = registry.log_run(store, exp, name="run", key="train:x:ident1", params={}, history=history, artifacts={},
                              tags={}, live=live)
    assert run_id == live.run_id
    assert steps(store, run_id, "loss") == [2, 4, 6] and steps(store, run_id, "val_loss") == [0, 4, 6]
    assert store.client.get_run(run_id).info.status == "FINISHED"
    assert len(store.client.search_runs([exp])) == 1


def test_a_dead_drivers_run_is_continued_and_a_logged_one_is_not_reopened(store, tmp_path):
    cfg = cfg_for(tmp_path, live_interval_s=0, system_metrics=False)
    metrics = tmp_path / "m.jsonl"
    first = registry.open_train_run(cfg, "ident2")
    write_rows(metrics, [row(0, evaluated=True), row(2, 2.9), row(4, 2.8)])
    first.poll(str(metrics))  # ... and the driver dies here
    again = registry.open_train_run(cfg, "ident2")
    assert again.run_id == first.run_id
    # The resumed workers replay steps 3-4 from the step-2 checkpoint: logged once, not twice.
    write_rows(metrics, [row(0, evaluated=True), row(2, 2.9), row(4, 2.8), row(6, 2.6)])
    assert again.poll(str(metrics)) == 1
    assert steps(store, again.run_id, "loss") == [2, 4, 6]
    other = registry.open_train_run(cfg, "ident3")  # other settings: another run
    assert other.run_id != first.run_id
    store.client.set_tag(again.run_id, "raylab.logged", "true")
    assert registry.open_train_run(cfg, "ident2") is None


def test_following_the_file_and_system_metrics(store, tmp_path, monkeypatch):
    import psutil  # noqa: F401 - in the test extra: system metrics need it
    cfg = cfg_for(tmp_path, live_interval_s=0.2, system_metrics=True)
    metrics = tmp_path / "follow.jsonl"
    live = registry.open_train_run(cfg, "ident4")
    live.follow(str(metrics))
    write_rows(metrics, [row(0, evaluated=True), row(2, 2.9)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (steps(store, live.run_id, "loss")
                                               and any(k.startswith("system/") for k in
                                                       store.client.get_run(live.run_id).data.metrics)):
        time.sleep(0.2)
    live.stop("KILLED")
    run = store.client.get_run(live.run_id)
    assert steps(store, live.run_id, "loss") == [2]
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    assert run.info.status == "KILLED"
