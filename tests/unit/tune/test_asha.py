"""ASHA without a running Ray: its rungs, its promotion rule and the board its decisions
reach the workers through."""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest
from ray.tune.schedulers import ASHAScheduler

from raylab.tune import asha


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
