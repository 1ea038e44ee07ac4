"""Canary rollout: `raylab deploy REF --canary PCT --for DURATION` and `raylab deploy --status`.

    raylab deploy acme-assistant/4 --canary 10 --for 10m   # 10 % of production traffic to version 4
    raylab deploy --status                                  # both versions' live metrics, the decision

`start_canary` checks the candidate, writes the rollout's state ($RAYLAB_HOME/serve/canary.json,
through core.storage), starts the controller and re-routes the Ingress (a `user_config`
change: no replica restarts). From then on the CLI is not needed: the decision is made by
`CanaryController`, a named, detached Ray actor (`max_restarts=-1`) on the endpoint's cluster.
The Ingress reports every production request of either version to it (fire and forget) and
the controller applies canary.decide every `serve.canary.check_interval_s`:

- promote: `registry.promote` moves `production` to the candidate (audited as
  registry.promote), the endpoint's routes switch to it, then `serve.canary_promote`;
- rollback: the canary share is taken away (traffic returns to the old version), then
  `serve.canary_rollback`; the registry's aliases never moved, so there is nothing to undo.

Why an actor and a state file: the rollout must end (promoted or rolled back) even when the
CLI that started it is gone, and a restarted controller (its process killed, its node lost)
must resume the same rollout with the metrics it had, not start a new window. The state,
with the per-version tallies, is written after every check; a restart reads it back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

import ray

from raylab import registry
from raylab.config import CanaryConfig
from raylab.core import cluster, events, runs, storage
from raylab.errors import UserError
from raylab.serve import deploy
from raylab.serve.canary import PROMOTE, ROLLBACK, WAIT, Decision, Tally, decide

log = logging.getLogger(__name__)

CONTROLLER = "raylab-canary"
NAMESPACE = events.NAMESPACE
RUNNING, PROMOTED, ROLLED_BACK = "running", "promoted", "rolled_back"


class CanaryController:
    """The rollout's decision maker (deployed as the named actor CONTROLLER). `observe` and
    `rate` are called by the Ingress; a thread checks the metrics every interval."""

    def __init__(self, state_file: str):
        self.file = state_file
        self.state = json.loads(storage.read_text(state_file))
        self.tallies = {v: Tally.from_dict(d) for v, d in self.state["tallies"].items()}
        self.lock = threading.Lock()
        self.state["starts"] = self.state.get("starts", 0) + 1  # > 1: a restarted controller resumed the rollout
        self._save()
        if self.state["status"] == RUNNING:
            threading.Thread(target=self._loop, name="canary-check", daemon=True).start()

    @classmethod
    def saved(cls, state_file: str) -> dict:
        """The status as last saved (no controller running, nothing resumed)."""
        self = cls.__new__(cls)
        self.state = json.loads(storage.read_text(state_file))
        self.tallies = {v: Tally.from_dict(d) for v, d in self.state["tallies"].items()}
        return self._view()

    def observe(self, version: str, status: int, latency_s: float, tokens: int) -> None:
        with self.lock:
            self.tallies.setdefault(version, Tally()).add(status, latency_s, tokens)

    def rate(self, version: str, score: float) -> None:
        with self.lock:
            self.tallies.setdefault(version, Tally()).rate(score)

    def status(self) -> dict:
        with self.lock:
            return self._view()

    def _view(self) -> dict:
        s = self.state
        return {k: v for k, v in s.items() if k != "tallies"} | {
            "elapsed_s": (s.get("decided") or time.time()) - s["started"],
            "metrics": {v: self.tallies.get(v, Tally()).snapshot() for v in (s["baseline"], s["candidate"])}}

    def _save(self) -> None:
        self.state["tallies"] = {v: t.to_dict() for v, t in self.tallies.items()}
        storage.replace_text(self.file, json.dumps(self.state))  # a kill mid-save leaves the last state

    def _loop(self) -> None:
        while self.state["status"] == RUNNING:
            time.sleep(self.state["thresholds"]["check_interval_s"])
            try:
                self.step()
            except Exception:  # the registry or the dashboard unreachable: try again at the next check
                log.exception("canary check failed; retrying")

    def step(self) -> Decision:
        """One check: the decision on the candidate's metrics, applied unless it is to wait."""
        s = self.state
        with self.lock:
            snap = self.tallies.get(s["candidate"], Tally()).snapshot()
            decision = decide(snap, s["thresholds"], time.time() - s["started"], s["window_s"])
            s["last_check"] = {"time": time.time(), "action": decision.action, "reason": decision.reason}
            self._save()
        if decision.action != WAIT:
            self._apply(decision)
        return decision

    def _apply(self, decision: Decision) -> None:
        s = self.state
        store = registry.open_store(tracking_uri=s["tracking_uri"])
        name, candidate = s["model"], int(s["candidate"].rsplit("/", 1)[1])
        if decision.action == PROMOTE:
            if int(registry.get_version(store, f"{name}@{registry.PRODUCTION}").version) != candidate:  # a resumed apply
                registry.promote(store, name, candidate, reason=f"canary: {decision.reason}")
            deploy.switch(s["dashboard"], store, name, candidate)
        else:  # the registry's production alias never moved: only the traffic goes back
            deploy.switch(s["dashboard"], store, name, int(s["baseline"].rsplit("/", 1)[1]))
        with self.lock:
            s["status"] = PROMOTED if decision.action == PROMOTE else ROLLED_BACK
            s["decided"], s["reason"] = time.time(), decision.reason
            view = self._view()
            self._save()
        run = registry.version_run(registry.get_version(store, s["candidate"]))
        events.emit("serve.canary_promote" if decision.action == PROMOTE else "serve.canary_rollback", run=run,
                    model=name, version=candidate, baseline=s["baseline"], reason=decision.reason,
                    metrics=view["metrics"], rollout=s["id"])
        log.info(f"canary {s['candidate']}: {s['status']} ({decision.reason})")


def _connect(address: str | None) -> None:
    """This process onto the endpoint's Ray cluster (recorded by `raylab serve`)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or deploy.endpoint_info().get("ray_address")
    if not address:
        raise UserError("the endpoint's Ray cluster is not known here; set RAY_ADDRESS (e.g. auto) to the cluster "
                        "`raylab serve` runs on")
    cluster.connect(None, address)


def _controller():
    try:
        return ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        return None


def start_canary(ref: str, percent: float, window_s: float | None = None, address: str | None = None,
                 tracking_uri: str | None = None, ray_address: str | None = None) -> dict:
    """Start the rollout (see the module docstring) and return its state; the decision comes
    later, from the controller. Thresholds: the deployed config's `serve.canary`."""
    if not 0 < percent < 100:
        raise UserError(f"--canary {percent:g}: give the candidate's share of production traffic, a percentage "
                        "above 0 and below 100")
    dashboard = deploy.dashboard_of(address)
    current, app = deploy.deployed(dashboard)
    routing = deploy.ingress_config(app)
    if routing.get("canary"):
        raise UserError(f"a canary rollout of {routing['canary']['candidate']} is already running; see "
                        "`raylab deploy --status`")
    if routing.get("registry") is False:
        raise UserError("the endpoint serves a plain model (no registry versions): a canary needs a registry version")
    thresholds = CanaryConfig(**(app["args"].get("canary") or {})).model_dump()
    window = window_s if window_s is not None else thresholds["window_s"]
    store = registry.open_store(tracking_uri=tracking_uri or app["args"]["tracking_uri"])
    name, version, _ = deploy.resolve(store, ref)  # checksums verified before any traffic goes to it
    candidate, baseline = f"{name}/{version}", routing["default"]
    if baseline.rsplit("/", 1)[0] != name:
        raise UserError(f"{ref} is a version of {name!r}; the endpoint serves {baseline}: a canary is another version "
                        "of the served model")
    if candidate == baseline:
        raise UserError(f"{ref} is {candidate}, the version the endpoint already serves")
    gates = registry.get_version(store, candidate).tags.get("raylab.gates.status", "pending")
    if gates != "passed":  # the controller could not promote it: refuse before it gets any traffic
        raise UserError(f"{candidate} may not be promoted (its gates are {gates!r}); run `raylab models evaluate "
                        f"{name} {version}` before a canary")
    _connect(ray_address)
    old = _controller()
    if old is not None:  # the controller of a finished rollout, idle
        ray.kill(old, no_restart=True)
    state = {"id": uuid.uuid4().hex[:12], "status": RUNNING, "model": name, "baseline": baseline,
             "candidate": candidate, "percent": percent, "window_s": window, "thresholds": thresholds,
             "started": time.time(), "dashboard": dashboard, "tracking_uri": store.uri, "tallies": {}}
    state_file = str(runs.home().canary)
    storage.write_text(state_file, json.dumps(state))
    actor = ray.remote(CanaryController).options(
        name=CONTROLLER, namespace=NAMESPACE, lifetime="detached", max_restarts=-1, max_task_retries=-1,
        num_cpus=0, max_concurrency=16).remote(state_file)
    ray.get(actor.status.remote())  # up before the Ingress reports to it
    canary = {"candidate": candidate, "percent": percent, "controller": CONTROLLER, "namespace": NAMESPACE}
    deploy.switch(dashboard, store, name, int(baseline.rsplit("/", 1)[1]), canary, current, app)
    events.emit("serve.canary_start", run=registry.version_run(registry.get_version(store, candidate)), model=name,
                version=version, baseline=baseline, percent=percent, window_s=window, thresholds=thresholds,
                rollout=state["id"])
    log.info(f"canary: {percent:g}% of {name}'s production traffic to {candidate} for {window:.0f}s; "
             "`raylab deploy --status` shows it")
    return ray.get(actor.status.remote())


def canary_status(ray_address: str | None = None) -> dict:
    """The rollout's state and both versions' metrics: live from the controller, else (its
    cluster gone) as last saved."""
    path = runs.home().canary
    if not path.exists():
        raise UserError("no canary rollout was started from this machine; start one with "
                        "`raylab deploy REF --canary PCT --for DURATION`")
    try:
        _connect(ray_address)
        actor = _controller()
    except UserError:
        actor = None
    if actor is not None:
        return ray.get(actor.status.remote(), timeout=60)
    return CanaryController.saved(str(path))


def describe(status: dict) -> str:
    """`raylab deploy --status`'s text."""
    lines = [f"canary {status['candidate']} ({status['percent']:g}% of production) vs {status['baseline']}: "
             f"{status['status']} after {status['elapsed_s']:.0f}s of a {status['window_s']:.0f}s window"]
    if status.get("reason"):
        lines.append(f"  decision: {status['reason']}")
    elif status.get("last_check"):
        lines.append(f"  last check: {status['last_check']['reason']}")
    lines.append(f"  {'version':<28} {'requests':>8} {'errors':>7} {'p99 ms':>8} {'tok/resp':>9} {'feedback':>9}")
    for version, m in status["metrics"].items():
        feedback = f"{m['feedback']:.2f} ({m['feedback_count']})" if m["feedback"] is not None else "-"
        lines.append(f"  {version:<28} {m['requests']:>8} {m['error_rate']:>7.1%} {m['p99_latency_ms']:>8.0f} "
                     f"{m['tokens_per_response']:>9.1f} {feedback:>9}")
    return "\n".join(lines)


__all__ = ["CONTROLLER", "PROMOTE", "ROLLBACK", "CanaryController", "canary_status", "describe", "start_canary"]
