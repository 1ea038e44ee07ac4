"""Tune-stage pieces that need no running Ray: the sweep's step budget, ASHA's rungs and
the board its decisions reach the workers through."""

from __future__ import annotations

import asyncio
import json
import os
import pickle

import pytest
from ray.tune.schedulers import ASHAScheduler

from raylab import asha, tune


def _ran(tune_dir, trial_id: str, steps: list[int]) -> None:
    metrics = tune_dir / "trials" / trial_id / "train" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))


def test_step_budget_counts_the_steps_a_trial_ran_past_its_last_result(tmp_path):
    stopper = tune._step_budget(20, str(tmp_path))
    # Trial a reported step 4, was stopped there by ASHA and trained on to step 8 before
    # the stop reached its workers: its metrics.jsonl says so.
    _ran(tmp_path, "a", [4, 8])
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
    stopper = tune._step_budget(100, str(tmp_path))
    assert stopper("a", {"step": 8}) is False
    assert stopper("b", {"step": 4}) is False
    assert stopper.spent == {"a": 8, "b": 4}
    _ran(tmp_path, "b", [4, 12])
    assert stopper("a", {"step": 16}) is False
    assert stopper.spent == {"a": 16, "b": 12}
    assert stopper("a", {"step": 20}) is False
    assert stopper.spent == {"a": 20, "b": 12}  # b did not report again: not re-read


@pytest.mark.parametrize(("grace", "factor", "max_t"), [(4, 3, 25), (4, 2, 17), (1, 4, 100), (8, 3, 25), (5, 2, 6)])
def test_rung_steps_are_the_rungs_ray_asha_decides_at(grace, factor, max_t):
    scheduler = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=max_t,
                              grace_period=grace, reduction_factor=factor)
    ray_rungs = sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs)
    assert asha.rung_steps(grace, factor, max_t) == ray_rungs


def test_decisions_reach_a_waiter_posted_before_or_after_it_waits():
    async def scenario():
        board = asha.Decisions()
        await board.post("a", 4, "CONTINUE")
        assert await board.wait("a", 4, timeout_s=1) == "CONTINUE"  # decided before the wait
        waiting = asyncio.ensure_future(board.wait("b", 4, timeout_s=5))
        await asyncio.sleep(0)
        await board.post("b", 8, "CONTINUE")  # another step: not this waiter's decision
        assert not waiting.done()
        await board.post("b", 4, "STOP")
        assert await waiting == "STOP"
        assert await board.wait("c", 4, timeout_s=0.01) is None  # never decided: the worker goes on

    asyncio.run(scenario())


def test_synced_asha_survives_tunes_pickle_with_its_actor_name():
    # Tuner.restore rebuilds the scheduler from the pickled experiment state; the resumed
    # driver then creates the actor under the same name (one per sweep directory).
    scheduler = asha.SyncedASHA(asha.actor_name("run/tune"), time_attr="step", metric="val_loss", mode="min",
                                max_t=25, grace_period=4, reduction_factor=3)
    restored = pickle.loads(pickle.dumps(scheduler))
    assert restored._decisions == asha.actor_name("run/tune") == asha.actor_name(os.path.abspath("run/tune"))
    assert asha.actor_name("run/tune") != asha.actor_name("other/tune")


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def _decide(scheduler, trial_id: str, step: int, loss: float) -> str:
    """The scheduler's decision on one result (Ray's bookkeeping only: nothing is posted)."""
    return ASHAScheduler.on_trial_result(scheduler, None, _Trial(trial_id), {"step": step, "val_loss": loss})


def _decisions(scheduler, losses: list[float], step: int = 4) -> list[str]:
    """The decisions for new trials reporting `losses` at `step` in turn."""
    out = []
    for i, loss in enumerate(losses):
        scheduler.on_trial_add(None, _Trial(str(i)))
        out.append(_decide(scheduler, str(i), step, loss))
    return out


def test_synced_asha_goes_on_only_in_the_top_third_of_its_rung_itself_included():
    scheduler = asha.SyncedASHA("unused", time_attr="step", metric="val_loss", mode="min",
                                max_t=25, grace_period=4, reduction_factor=3)
    assert sorted(m for m, _ in scheduler._brackets[0]._rungs) == [4, 12]  # Ray's rungs, kept
    # n = 1, 2: the rung's best goes on; n = 3..5: only the best; n = 6: the best two
    assert _decisions(scheduler, [5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 2.0]) == [
        "CONTINUE", "CONTINUE", "STOP", "CONTINUE", "STOP", "CONTINUE", "CONTINUE"]
    assert _decisions(scheduler, [9.0, float("nan")], step=12) == ["CONTINUE", "STOP"]


def test_ray_asha_lets_a_second_best_through_a_rung_of_three():
    # Why SyncedASHA replaces the rule: Ray's interpolated percentile over the two earlier
    # trials lets the third go on though it is not in the top third (1 of 3).
    ray_asha = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=25, grace_period=4,
                             reduction_factor=3)
    synced = asha.SyncedASHA("unused", time_attr="step", metric="val_loss", mode="min", max_t=25,
                             grace_period=4, reduction_factor=3)
    assert _decisions(ray_asha, [5.0, 4.0, 4.2]) == ["CONTINUE", "CONTINUE", "CONTINUE"]
    assert _decisions(synced, [5.0, 4.0, 4.2]) == ["CONTINUE", "CONTINUE", "STOP"]


def test_synced_asha_decides_nothing_at_the_last_step():
    # 16 steps (max_t 17): Ray's rungs are 4, 8 and 16; at step 16 the trial's steps are
    # spent and a stop would only discard its final model.
    synced = asha.SyncedASHA("unused", time_attr="step", metric="val_loss", mode="min", max_t=17,
                             grace_period=4, reduction_factor=2)
    assert sorted(m for m, _ in synced._brackets[0]._rungs) == [4, 8]
    decided = []
    for trial_id, losses in (("a", [5.0, 5.0, 5.0]), ("b", [4.0, 4.0, 4.0]), ("c", [3.0, 3.0, 4.5])):
        synced.on_trial_add(None, _Trial(trial_id))
        decided += [_decide(synced, trial_id, step, loss) for step, loss in zip((4, 8, 16), losses, strict=True)]
    assert decided == ["CONTINUE"] * 9  # c, third of three at 16, would be stopped there
