"""ASHA whose stop decisions reach a trial's workers at the rung, not several steps later.

Ray Train V2 workers report asynchronously: `ray.train.report` returns at once, the Train
controller polls the workers, a `TuneReportCallback` forwards the result to the Tune trial,
and only then does ASHA decide. A trial ASHA stops at a rung has by then trained on (on the
benchmark's problem a trial stopped at step 4 had usually reached step 8, one stopped at 12
had reached 16), and that compute is wasted. So:

- `SyncedASHA` (an `ASHAScheduler`, used by `raylab tune` whenever `tune.asha` is set) also
  posts every decision to a `Decisions` actor, keyed by trial and step;
- the workers of a trial, at their first evaluation at or past each rung, wait there for
  that decision (`RungWait`): CONTINUE lets them go on, STOP keeps them idle until Tune's
  stop ends the trial. No decision within `WAIT_S` (a Tune driver too busy, or a result that
  never reached the scheduler) and they go on as before: the wait can cost a little wall
  time, never a result.

It also decides by ASHA's own promotion rule (Li et al. 2020, "A System for Massively
Parallel Hyperparameter Tuning", Algorithm 2): a trial goes on past a rung only if it ranks in
the top floor(n / reduction_factor) of the n trials recorded there, itself included, and the
rung's best so far always goes on (so every sweep finishes a trial). Ray's `ASHAScheduler`
instead compares with an interpolated percentile of the trials recorded before it, which lets
through trials ranked below the top 1/reduction_factor while a rung holds few trials: with
one trial at a time that is the start of every sweep, and those trials then train to the end
(`TopBracket`).

The cost is one round trip per rung (the Train controller's poll interval,
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, plus Tune's processing: about a second here), small
beside the steps it saves. Run it as part of a sweep: `raylab tune configs/quickstart.yaml`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time

from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

log = logging.getLogger(__name__)


WAIT_S = 120.0  # longest a worker waits for a decision before going on without one
STOP_WAIT_S = 600.0  # longest a stopped trial's workers idle before they report the missing stop
# A fixed namespace: the trials' workers and a resumed driver find the actor by name whatever
# namespace the driver's session has (an anonymous one by default, Ray Client, a job).
NAMESPACE = "raylab"


def actor_name(tune_dir: str) -> str:
    """One name per sweep directory, so a resumed sweep's scheduler (restored from Tune's
    pickle) and its new trials find the actor the new driver created."""
    where = tune_dir if "://" in tune_dir else os.path.abspath(tune_dir)
    return "raylab-asha-" + hashlib.sha1(where.encode()).hexdigest()[:12]


def rung_steps(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """ASHA's rungs (one bracket): grace * rf**k below max_t, as Ray's `_Bracket` builds them."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return sorted(int(grace_period * reduction_factor**k) for k in range(count))


class Decisions:
    """The scheduler's decisions, by (trial id, step); workers wait on them. An async actor:
    many workers wait at once while the scheduler posts."""

    def __init__(self):
        self.decided: dict[tuple[str, int], str] = {}
        self.waiting: dict[tuple[str, int], asyncio.Event] = {}

    async def post(self, trial_id: str, step: int, decision: str) -> None:
        key = (trial_id, step)
        self.decided[key] = decision
        if key in self.waiting:
            self.waiting.pop(key).set()

    async def wait(self, trial_id: str, step: int, timeout_s: float) -> str | None:
        key = (trial_id, step)
        if key not in self.decided:
            event = self.waiting.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                return None
        return self.decided[key]


_handles: dict[str, object] = {}  # name -> actor handle; outside the scheduler, which Tune pickles


def start(tune_dir: str) -> str:
    """Create (or find) the sweep's `Decisions` actor, which lives as long as the driver; returns its name."""
    import ray

    name = actor_name(tune_dir)
    # The handle is kept: an actor is destroyed once no handle to it is left, named or not.
    _handles[name] = ray.remote(num_cpus=0)(Decisions).options(name=name, namespace=NAMESPACE,
                                                                get_if_exists=True).remote()
    return name


def _actor(name: str):
    import ray

    if name not in _handles:
        try:
            _handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # not created (a scheduler restored without its driver's start())
            return None
    return _handles[name]


class TopBracket(_Bracket):
    """An ASHA bracket deciding by the promotion rule: go on only in the top
    max(1, floor(n / reduction_factor)) of the n trials at the rung, this one included.

    `cutoff` gets the rewards recorded before this trial (higher is better; Ray negates a
    loss) and returns the lowest reward that still goes on; `_Bracket.on_result` stops a
    trial whose reward is below it. Ties go on; a NaN (a diverged loss) stops.

    raylab's max_t is one past a trial's last step (sweep.run_tune), so a rung of Ray's at
    max_t - 1 or later is dropped: there the steps are spent, and a stop would only discard
    the trial's final model (its workers do not wait there either: `RungWait`)."""

    def __init__(self, min_t: int, max_t: int, reduction_factor: float, s: int, stop_last_trials: bool = True):
        super().__init__(min_t, max_t, reduction_factor, s, stop_last_trials=stop_last_trials)
        self._rungs = [(milestone, recorded) for milestone, recorded in self._rungs if milestone < max_t - 1]

    def on_result(self, trial, cur_iter: int, cur_rew: float | None) -> str:
        if cur_rew is not None and math.isnan(cur_rew) and self._rungs and cur_iter >= self._rungs[-1][0]:
            return ASHAScheduler.STOP  # Ray's `cur_rew < cutoff` is False for NaN: it would go on
        return super().on_result(trial, cur_iter, cur_rew)

    def cutoff(self, recorded: dict) -> float | None:
        rewards = sorted((r for r in recorded.values() if not math.isnan(r)), reverse=True)
        if not rewards:
            return None
        keep = max(1, int((len(rewards) + 1) / self.rf))
        return rewards[keep - 1]


class SyncedASHA(ASHAScheduler):
    """`ASHAScheduler` deciding by ASHA's promotion rule (`TopBracket`) that also posts each
    decision for the trial's workers to wait on."""

    def __init__(self, decisions: str, *, grace_period: int, reduction_factor: float, max_t: int, **asha):
        super().__init__(grace_period=grace_period, reduction_factor=reduction_factor, max_t=max_t, **asha)
        self._decisions = decisions
        # the brackets Ray built (same rungs and offsets), deciding by the promotion rule
        self._brackets = [TopBracket(grace_period, max_t, reduction_factor, s, stop_last_trials=self._stop_last_trials)
                          for s in range(len(self._brackets))]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        actor = _actor(self._decisions)
        if actor is not None and self._time_attr in result:
            actor.post.remote(trial.trial_id, int(result[self._time_attr]), decision)
        return decision


class RungWait:
    """The worker side, a train-loop gate (raylab.train.run_train's `gate`): `start` once in
    each worker, then `after_eval(step)` once per evaluation reported to Ray Train.

    Built by the trial driver from plain values (it travels to the workers by pickle); the
    actor is looked up in the worker. Rungs at or past the run's last step are skipped:
    nothing is left there to save."""

    def __init__(self, actor: str, trial_id: str, rungs: list[int]):
        self.actor_name, self.trial_id, self.rungs = actor, trial_id, list(rungs)
        self.actor = None

    def start(self, start_step: int, last_step: int) -> None:
        import ray

        self.actor = ray.get_actor(self.actor_name, namespace=NAMESPACE)
        self.rungs = [r for r in self.rungs if start_step < r < last_step]

    def after_eval(self, step: int) -> None:
        if not self.rungs or step < self.rungs[0]:
            return
        import ray

        self.rungs = [r for r in self.rungs if r > step]
        decision = ray.get(self.actor.wait.remote(self.trial_id, step, WAIT_S))
        if decision is None:
            log.info(f"tune: no ASHA decision for step {step} within {WAIT_S:.0f} s; training on")
        elif decision == ASHAScheduler.STOP:
            log.info(f"tune: ASHA stopped this trial at step {step}; waiting for Tune to end it")
            time.sleep(STOP_WAIT_S)  # Tune ends the trial (and these workers) long before
            raise RuntimeError(f"ASHA stopped trial {self.trial_id} at step {step}, but Tune did not end it "
                               f"within {STOP_WAIT_S:.0f} s: a bug, please report it")
