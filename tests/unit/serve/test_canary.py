"""The canary rollout's pure parts (raylab/serve/canary.py) and the Ingress's side of it,
without Ray: the decision rule over per-version snapshots (holds -> promote; each threshold
broken -> rollback; too few requests -> wait, then rollback after the patience), the sticky
traffic share, the metrics a Tally keeps, `--for` durations, the serve.canary section, and
the Ingress splitting production traffic and taking feedback (FastAPI's TestClient)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from raylab import config
from raylab.config import CanaryConfig
from raylab.errors import ConfigError
from raylab.serve.app import ROUTERS, IngressImpl, create_app
from raylab.serve.canary import (
    PROMOTE,
    ROLLBACK,
    WAIT,
    Tally,
    breaches,
    canary_share,
    decide,
    parse_duration,
)

T = CanaryConfig(max_error_rate=0.05, max_p99_latency_ms=500, max_tokens_per_response=20, min_feedback=0.5,
                 min_feedback_count=3, min_requests=10, patience=3).model_dump()


def snap(n: int = 20, errors: int = 0, latency_s: float = 0.1, tokens: int = 10, ratings=()) -> dict:
    t = Tally()
    for i in range(n):
        t.add(500 if i < errors else 200, latency_s, tokens)
    for r in ratings:
        t.rate(r)
    return t.snapshot()


def test_a_candidate_that_holds_for_the_window_is_promoted_and_not_before():
    good = snap()
    assert breaches(good, T) == []
    assert decide(good, T, elapsed_s=30, window_s=30).action == PROMOTE
    assert decide(good, T, elapsed_s=29, window_s=30).action == WAIT  # control: the window has not passed


@pytest.mark.parametrize("bad, key", [
    (dict(errors=2), "max_error_rate"),                  # 2/20 = 0.10 > 0.05
    (dict(latency_s=0.8), "max_p99_latency_ms"),         # 800 ms > 500
    (dict(tokens=25), "max_tokens_per_response"),        # 25 > 20
    (dict(ratings=(0.0, 0.0, 1.0)), "min_feedback"),     # mean 0.33 < 0.5 over 3 ratings
])
def test_each_broken_threshold_rolls_back_at_once_naming_its_key(bad, key):
    decision = decide(snap(**bad), T, elapsed_s=1, window_s=600)  # long before the window ends
    assert decision.action == ROLLBACK and f"serve.canary.{key}" in decision.reason
    # the negative control: just inside each threshold, it holds
    inside = {"errors": 1, "latency_s": 0.5, "tokens": 20, "ratings": (0.0, 1.0, 1.0)}[next(iter(bad))]
    assert decide(snap(**{next(iter(bad)): inside}), T, elapsed_s=1, window_s=600).action == WAIT


def test_too_few_requests_waits_even_when_they_all_failed_then_rolls_back_after_the_patience():
    few = snap(n=9, errors=9)
    assert decide(few, T, elapsed_s=100, window_s=60).action == WAIT  # past the window, below patience x window
    late = decide(few, T, elapsed_s=180, window_s=60)
    assert late.action == ROLLBACK and "min_requests" in late.reason
    assert decide(snap(n=10), T, elapsed_s=180, window_s=60).action == PROMOTE  # control: enough requests


def test_feedback_is_judged_only_from_min_feedback_count_ratings_and_unset_thresholds_are_not_checked():
    assert decide(snap(ratings=(0.0, 0.0)), T, 1, 600).action == WAIT  # 2 < min_feedback_count
    loose = CanaryConfig(min_requests=10).model_dump()  # no latency, token or feedback threshold
    assert decide(snap(latency_s=30, tokens=10_000, ratings=(0.0,) * 5), loose, 60, 60).action == PROMOTE


def test_a_4xx_is_the_clients_not_an_error_of_the_version():
    t = Tally()
    for status in (200, 400, 404, 500):
        t.add(status, 0.1, 4)
    s = t.snapshot()
    assert (s["requests"], s["errors"], s["error_rate"]) == (4, 1, 0.25)
    assert s["tokens_per_response"] == 16 / 3  # over the successful (non-5xx) responses


def test_the_p99_is_a_latency_some_request_had_and_a_tally_survives_its_state_file():
    t = Tally()
    for ms in range(1, 101):  # 1..100 ms
        t.add(200, ms / 1000, 1)
    assert t.snapshot()["p99_latency_ms"] == pytest.approx(99)
    t.rate(0.25)
    again = Tally.from_dict(t.to_dict())
    assert again.snapshot() == t.snapshot()


def test_the_traffic_share_is_sticky_close_to_the_percentage_and_reshuffled_by_the_salt():
    users = [f"user-{i}" for i in range(4000)]
    chosen = {u for u in users if canary_share(u, 10, "m/2")}
    assert 320 <= len(chosen) <= 480  # about 10 %
    assert chosen == {u for u in users if canary_share(u, 10, "m/2")}  # the same users every time
    other = {u for u in users if canary_share(u, 10, "m/3")}
    assert other != chosen and 320 <= len(other) <= 480  # another rollout, other users
    assert not any(canary_share(u, 0, "m/2") for u in users) and all(canary_share(u, 100, "m/2") for u in users)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("45", 45), ("1d", 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "", "0m", "-5s", "10 minutes"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_the_serve_canary_section_forbids_unknown_keys_and_bad_values():
    base = {"version": 1, "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]}, "model": {"name_or_path": "m"}}
    cfg = config.load_dict(base | {"serve": {"canary": {"max_error_rate": 0.02, "window_s": 5}}})
    assert cfg.serve.canary.max_error_rate == 0.02 and cfg.serve.canary.min_requests == 20
    for bad in ({"max_eror_rate": 0.1}, {"max_error_rate": 2}, {"min_feedback": -1}):
        with pytest.raises(ConfigError, match="serve.canary"):
            config.load_dict(base | {"serve": {"canary": bad}})


LIMITS = {"max_prompt_tokens": 64, "max_tokens": 32, "max_request_bytes": 2000, "max_batch_size": 4,
          "batch_wait_timeout_s": 0.0, "max_adapters_per_replica": 2}
CATALOG = {"routes": {"m": "m/1", "m@production": "m/1", "m/1": "m/1", "m/2": "m/2"},
           "listed": ["m", "m@production", "m/1", "m/2"], "default": "m/1"}
CANARY = {"candidate": "m/2", "percent": 30.0, "controller": "unused", "namespace": "unused"}


class Ingress(IngressImpl):
    """The ingress with its controller reports kept in a list (the actor is rollout.py's)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reports = []

    def report(self, method: str, *args) -> None:
        self.reports.append((method, *args))


def request(headers: dict | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw, "client": ("10.0.0.1", 1)})


@pytest.fixture
def server():
    impl = Ingress(generator=None, args={"limits": LIMITS})
    impl.reconfigure(CATALOG | {"canary": CANARY})
    return impl


def test_the_ingress_splits_production_traffic_only_by_user_or_key(server):
    users = [f"u{i}" for i in range(300)]
    went = {u: server.split("m", "m/1", u, request()) for u in users}
    share = sum(v == "m/2" for v in went.values()) / len(users)
    assert 0.2 < share < 0.4 and set(went.values()) == {"m/1", "m/2"}
    assert all(server.split("m@production", "m/1", u, request()) == went[u] for u in users)  # sticky, either name
    assert {server.split("m/1", "m/1", u, request()) for u in users} == {"m/1"}  # a pinned version is not split
    keys = [f"Bearer sk-{i}" for i in range(300)]  # no `user`: the API key decides, stably
    by_key = [server.split("m", "m/1", None, request({"Authorization": k})) for k in keys]
    assert "m/2" in by_key and by_key == [server.split("m", "m/1", None, request({"Authorization": k})) for k in keys]
    server.reconfigure(CATALOG)  # the control: no canary, nothing split
    assert {server.split("m", "m/1", u, request()) for u in users} == {"m/1"}


def test_answered_requests_are_reported_per_version_while_a_canary_runs(server):
    server.record("m", "m/2", 200, 0.0, 5, 7)
    server.record("m", "m/1", 500, 0.0, 5, 0)
    server.record("other", None, 404, 0.0)  # reached no version: not the rollout's
    assert [(r[0], r[1], r[2], r[4]) for r in server.reports] == [("observe", "m/2", 200, 7), ("observe", "m/1", 500, 0)]
    server.reconfigure(CATALOG)
    server.record("m", "m/2", 200, 0.0, 5, 7)  # control: no canary, no reports
    assert len(server.reports) == 2


def test_feedback_counts_for_the_version_that_answered(server):
    client = TestClient(create_app(ROUTERS, server))
    server.answered_by("chatcmpl-a", "m/2")
    ok = client.post("/v1/feedback", json={"id": "chatcmpl-a", "score": 0})
    assert ok.status_code == 200 and ok.json()["version"] == "m/2" and ok.json()["counted_by_canary"]
    assert server.reports == [("rate", "m/2", 0.0)]
    unknown = client.post("/v1/feedback", json={"id": "chatcmpl-zzz", "score": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "response_not_found"
    for bad in ({"id": "chatcmpl-a", "score": 2}, {"id": "chatcmpl-a"}, {"id": "chatcmpl-a", "score": 1, "x": 1}):
        assert client.post("/v1/feedback", json=bad).status_code == 400
    assert len(server.reports) == 1  # refused ratings are not counted


def test_a_restarted_controller_resumes_the_rollout_with_its_tallies(tmp_path):
    """The controller's state file (what Ray's restart of the actor reads back): the tallies
    and the last check survive a new instance, which counts itself as a restart; the window
    keeps running from the original start, not from the restart."""
    import json
    import time

    from raylab.serve.rollout import RUNNING, CanaryController

    path = tmp_path / "canary.json"
    thresholds = CanaryConfig(min_requests=3, check_interval_s=3600).model_dump()  # its own thread never checks here
    path.write_text(json.dumps({"id": "r1", "status": RUNNING, "model": "m", "baseline": "m/1", "candidate": "m/2",
                                "percent": 10.0, "window_s": 60.0, "thresholds": thresholds,
                                "started": time.time() - 50, "tallies": {}}))
    first = CanaryController(str(path))
    for _ in range(3):
        first.observe("m/2", 200, 0.2, 12)
    first.observe("m/1", 200, 0.1, 9)
    first.rate("m/2", 1.0)
    assert first.step().action == WAIT  # 50 s of a 60 s window
    again = CanaryController(str(path))  # the restarted actor
    status = again.status()
    assert status["starts"] == 2 and status["last_check"]["action"] == WAIT
    assert status["metrics"]["m/2"] | {"p99_latency_ms": 0} == {
        "requests": 3, "errors": 0, "error_rate": 0.0, "p99_latency_ms": 0, "tokens_per_response": 12.0,
        "feedback_count": 1, "feedback": 1.0}
    assert status["metrics"]["m/1"]["requests"] == 1 and status["elapsed_s"] >= 50
    assert CanaryController.saved(str(path))["metrics"] == status["metrics"]  # --status without a cluster


def test_a_candidate_that_fails_to_load_leaves_the_generator_replica_serving_production():
    """Generator.reconfigure preloads the routed version and a canary's candidate. A
    candidate that fails to load is logged, not raised: raising has Serve stop the replica
    and restart it with the same list, so production's traffic failed with it. The routed
    version itself must load (the control: that failure still fails the replica)."""
    import asyncio

    from raylab.serve.generator import GeneratorBase

    loaded = []

    async def get_model(version: str):
        if version == "m/2":
            raise RuntimeError("Error(s) in loading state_dict for PeftModel: size mismatch")
        loaded.append(version)

    generator = GeneratorBase.__new__(GeneratorBase)  # no replica, no models: reconfigure's own logic
    generator.get_model = get_model
    generator._pinned, generator._live, generator._loading = {}, {}, {}  # no operator-loaded versions
    asyncio.run(generator.reconfigure({"preload": ["m/1", "m/2"]}))
    assert loaded == ["m/1"]
    with pytest.raises(RuntimeError, match="size mismatch"):
        asyncio.run(generator.reconfigure({"preload": ["m/2", "m/1"]}))
    asyncio.run(generator.reconfigure({"preload": []}))  # nothing to preload
    assert loaded == ["m/1"]
