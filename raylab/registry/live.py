"""Live tracking: a train run's MLflow run opens when training starts and its metrics arrive
while it goes, so a long fine-tune can be watched in the MLflow UI.

    live = registry.open_train_run(cfg, identity)    # the train driver, before trainer.fit()
    live.follow(run.train_metrics)                   # a driver thread: new metrics.jsonl rows, batched
    ... trainer.fit() ...
    live.stop()                                      # then track_train(cfg, meta, live) finishes the run

Only the driver writes (DESIGN.md: workers never write the registry): rank 0 already writes
every metrics row to `metrics.jsonl` in the run directory (local or S3), and a thread of the
driver reads that file every `registry.live_interval_s` seconds and logs the rows it has not
logged yet in one `log_batch`. Ray Train's reports reach the driver only at evaluations
(through its controller, another process), while the file holds every `train.log_every` row.
With psutil installed, MLflow's own system-metrics monitor samples the driver's node at the
same interval (`registry.system_metrics`). A run whose driver died is continued by the next
driver (found by its `raylab.key`); the last step it logged is the run's `raylab.live_step` tag.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import threading
import time

from raylab.core import storage
from raylab.registry.store import Store

log = logging.getLogger(__name__)

LIVE_STEP = "raylab.live_step"  # the last metrics step logged (a resumed driver continues after it)


def metric_rows(history: list[dict]) -> list:
    """MLflow metrics from metrics.jsonl rows: every finite number at its step; validation
    metrics only at the steps that evaluated (other rows repeat the last evaluation)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for row in history:
        step = int(row.get("step", 0))
        stamp = int(row["time"] * 1000) if isinstance(row.get("time"), (int, float)) else now
        for k, v in row.items():
            if k in ("step", "time") or (k.startswith(("val_", "best_val")) and row.get("evaluated") is False):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(Metric(k, float(v), stamp, step))
    return out


class LiveRun:
    """An MLflow run fed while training goes. Thread-safe: the follower thread and the
    driver's final flush both call `log`."""

    def __init__(self, store: Store, run_id: str, logged_step: int, interval_s: float, system_metrics: bool,
                 resumed: bool = False):
        self.store, self.run_id, self.interval_s = store, run_id, interval_s
        self._logged_step, self._at_step = logged_step, 1 if resumed else 0  # rows logged at _logged_step
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread: threading.Thread | None = None
        self._monitor = None
        if system_metrics:
            self._start_monitor(resumed)

    def log(self, history: list[dict]) -> int:
        """Log the rows of `history` (metrics.jsonl rows) not logged yet; returns how many.
        A step is logged once (a resumed worker replays the steps after its checkpoint);
        several rows of one step (an epoch that ended short of the plan) are all logged."""
        from mlflow.entities import RunTag

        with self._lock:
            fresh, seen = [], {}
            for row in history:
                step = int(row.get("step", 0))
                seen[step] = seen.get(step, 0) + 1
                if step > self._logged_step or (step == self._logged_step and seen[step] > self._at_step):
                    fresh.append(row)
            if not fresh:
                return 0
            metrics = metric_rows(fresh)
            last = int(fresh[-1].get("step", 0))
            for i in range(0, len(metrics), 1000):
                tags = [RunTag(LIVE_STEP, str(last))] if i + 1000 >= len(metrics) else []
                self.store.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], tags=tags)
            self._logged_step, self._at_step = last, seen[last]
            return len(fresh)

    def follow(self, location: str) -> None:
        """Log new rows of the JSON-lines file at `location` every interval, in a daemon thread."""
        if self.interval_s <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.poll(location)

        self._thread = threading.Thread(target=loop, name="raylab-live-tracking", daemon=True)
        self._thread.start()

    def poll(self, location: str) -> int:
        """One read of the file; a failure is a warning: tracking never stops training."""
        try:
            return self.log(read_rows(location))
        except Exception as e:  # an unreachable server for a while, a file being replaced
            log.warning(f"registry: live metrics not sent this time ({type(e).__name__}: {e}); will retry")
            return 0

    def stop(self, status: str | None = None) -> None:
        """Stop following (and the system metrics); with `status` (FAILED, KILLED) end the run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:  # noqa: BLE001 - MLflow's monitor may already have stopped
                log.debug(f"system metrics monitor: {e}")
            self._monitor = None
        if status is not None:
            self.store.client.set_terminated(self.run_id, status=status)

    def _start_monitor(self, resumed: bool) -> None:
        if importlib.util.find_spec("psutil") is None:
            log.info("registry: no system metrics (pip install psutil to log CPU/memory/disk/network to MLflow)")
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop lines per run
        interval = self.interval_s or 10.0
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=resumed,
                                             tracking_uri=self.store.uri)
        self._monitor.start()


def read_rows(location: str) -> list[dict]:
    """The complete rows of a JSON-lines file (a line being written is left for next time)."""
    if not storage.exists(location):
        return []
    rows = []
    for line in storage.read_text(location).splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows
