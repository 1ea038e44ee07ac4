"""The sweep's own progress line: one per finished trial, with the best so far and an ETA.

    tune: 3/12 trials done (1 stopped early, 0 failed), best val_loss 2.314 (trial 5f3a_00002) | 2m10s, ETA ~6m

A Ray Tune `Callback` (Tune's extension point for watching trials from the driver); the
trials' own train progress lines still come from their workers. The ETA assumes the
remaining trials take as long on average as the finished ones (early-stopped ones
included), so it is rough while few have finished.
"""

from __future__ import annotations

import logging
import math
import time

from ray.tune import Callback

from raylab.core.logs import duration

log = logging.getLogger(__name__)


class SweepProgress(Callback):
    def __init__(self, num_samples: int, metric: str, mode: str, last_step: int):
        self.num_samples, self.metric, self.mode, self.last_step = num_samples, metric, mode, last_step
        self.started = time.monotonic()
        self.done = self.failed = self.stopped = 0
        self.best: tuple[float, str] | None = None

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        step = (trial.last_result or {}).get("step")
        if step is not None and step < self.last_step:  # ASHA (or the step budget) stopped it
            self.stopped += 1
        self._record(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self.failed += 1
        self._record(trial)

    def _record(self, trial) -> None:
        value = (trial.last_result or {}).get(self.metric)
        if value is not None and math.isfinite(value):
            better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
            if better:
                self.best = (value, trial.trial_id)
        log.info(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        left = max(0, self.num_samples - self.done)
        eta = f", ETA ~{duration(elapsed / self.done * left)}" if self.done and left else ""
        best = f", best {self.metric} {self.best[0]:.4g} (trial {self.best[1]})" if self.best else ""
        return (f"tune: {self.done}/{self.num_samples} trials done ({self.stopped} stopped early, {self.failed} failed)"
                f"{best} | {duration(elapsed)}{eta}")
