"""The sweep's step budget, without a running Ray: a trial counts the steps its metrics
show it ran, not only its last result."""

from __future__ import annotations

import json
from pathlib import Path

from raylab.core import runs
from raylab.tune import sweep


def _ran(run: runs.Run, trial_id: str, steps: list[int]) -> None:
    metrics = Path(run.trial(trial_id).train_metrics)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))


def test_step_budget_counts_the_steps_a_trial_ran_past_its_last_result(tmp_path):
    run = runs.Run(str(tmp_path))
    stopper = sweep.step_budget(20, run)
    # Trial a reported step 4, was stopped there by ASHA and trained on to step 8 before
    # the stop reached its workers: its metrics.jsonl says so.
    _ran(run, "a", [4, 8])
    assert stopper("a", {"step": 4}) is False
    assert stopper.spent == {"a": 4}  # while a is the one reporting, its result is what counts
    assert stopper("b", {"step": 4}) is False  # b has written no metrics yet
    assert stopper.spent == {"a": 8, "b": 4}
    assert stopper("b", {"step": 8}) is False
    assert stopper("b", {"step": 12}) is True  # 8 + 12 >= 20
    assert stopper.stop_all() is True


def test_step_budget_keeps_a_results_steps_when_the_metrics_show_fewer(tmp_path):
    # A trial without metrics (failed before its first log line) or with fewer steps than it
    # reported still counts what it reported; concurrent trials are re-read after reporting.
    run = runs.Run(str(tmp_path))
    stopper = sweep.step_budget(100, run)
    assert stopper("a", {"step": 8}) is False
    assert stopper("b", {"step": 4}) is False
    assert stopper.spent == {"a": 8, "b": 4}
    _ran(run, "b", [4, 12])
    assert stopper("a", {"step": 16}) is False
    assert stopper.spent == {"a": 16, "b": 12}
    assert stopper("a", {"step": 20}) is False
    assert stopper.spent == {"a": 20, "b": 12}  # b did not report again: not re-read
