"""The sweep's progress line (raylab/tune/progress.py), driven by trial records."""

from __future__ import annotations

from types import SimpleNamespace

from raylab.tune.progress import SweepProgress


def trial(tid: str, step: int | None, val: float | None):
    return SimpleNamespace(trial_id=tid, last_result={} if step is None else {"step": step, "val_loss": val})


def test_counts_best_and_eta(caplog):
    p = SweepProgress(4, "val_loss", "min", last_step=16)
    with caplog.at_level("INFO", logger="raylab.tune.progress"):
        p.on_trial_complete(0, [], trial("t1", 16, 2.5))
        p.on_trial_complete(0, [], trial("t2", 4, 3.1))  # cut by ASHA at its first rung
        p.on_trial_error(0, [], trial("t3", None, None))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("tune: 1/4 trials done (0 stopped early, 0 failed), best val_loss 2.5 (trial t1) | ")
    assert "ETA ~" in lines[0]
    assert lines[2].startswith("tune: 3/4 trials done (1 stopped early, 1 failed), best val_loss 2.5 (trial t1)")
    p.on_trial_complete(0, [], trial("t4", 16, 2.0))
    assert "best val_loss 2 (trial t4)" in p.line() and "ETA" not in p.line()  # all done: no ETA


def test_mode_max_and_nan_ignored():
    p = SweepProgress(3, "acc", "max", last_step=8)
    p.on_trial_complete(0, [], SimpleNamespace(trial_id="a", last_result={"step": 8, "acc": 0.5}))
    p.on_trial_complete(0, [], SimpleNamespace(trial_id="b", last_result={"step": 8, "acc": float("nan")}))
    p.on_trial_complete(0, [], SimpleNamespace(trial_id="c", last_result={"step": 8, "acc": 0.4}))
    assert "best acc 0.5 (trial a)" in p.line()
