"""Load for the serving tests: client threads that record every request's outcome (HTTP
status, error: the exception's type or the OpenAI error's code, latency, text), retry a
failed request at most `retries` times as a client library would, and fail the test if a
thread dies or outlives its stop. A reset, a timeout, a cut stream or a bad body is an
outcome like a 500, never a silently dead thread.

    with Load(8, lambda i, mark: stream(url, "/v1/completions", body, mark=mark), retries=1) as load:
        wait_for(lambda: load.streaming() >= 4)      # clients that have a token of an open stream
    load.check()                                      # no thread died or hung
    assert load.success_rate() >= 0.99, load.failures()
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def answers_across(switch, ask, clients: int = 3, each_side: int = 6) -> list[str]:
    """`clients` asking (Load's `ask`) while `switch()` runs, at least `each_side` requests
    sent before it and after it: no request failed and no client hung; the answers in the
    order they were sent."""
    with Load(clients, ask) as load:
        wait_for(lambda: len(load.outcomes) >= each_side, 60, "traffic before the switch")
        switch()
        switched = time.monotonic()
        wait_for(lambda: sum(1 for o in load.outcomes if o.started > switched) >= each_side, 60,
                 "traffic after the switch")
    load.check()
    assert not load.failures(), load.failures()[:3]
    return [o.text for o in sorted(load.outcomes, key=lambda o: o.started)]


@dataclass
class Outcome:
    client: int
    request: int  # the client's n-th request
    attempt: int  # 0, then 1.. for the client's retries of it
    started: float  # time.monotonic()
    ended: float
    status: int | None  # None: no HTTP response (refused, reset, timed out)
    error: str | None  # None = success
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


def stream(url: str, path: str, body: dict, key: str | None = None, timeout_s: float = 60,
           mark: Callable[[], None] | None = None) -> tuple[int, str | None, str]:
    """POST a streaming request: (status, error, text). error is None only for a 200 whose
    events end with [DONE]; else the error event's code, the error body's code, or
    "truncated" (the stream ended without [DONE]). `mark()` is called at the first text."""
    where = urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout_s)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                                      **({"Authorization": f"Bearer {key}"} if key else {})})
        r = conn.getresponse()
        if r.status != 200:
            raw = r.read().decode()
            try:
                return r.status, json.loads(raw)["error"]["code"] or f"http_{r.status}", raw
            except (ValueError, KeyError, TypeError):
                return r.status, f"http_{r.status}", raw
        text = ""
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return r.status, None, text
            event = json.loads(line[6:])
            if "error" in event:
                return r.status, event["error"]["code"] or event["error"]["type"], text
            for choice in event["choices"]:
                piece = choice.get("text") or choice.get("delta", {}).get("content") or ""
                if piece and not text and mark is not None:
                    mark()
                text += piece
        return r.status, "truncated", text
    finally:
        conn.close()


class Load:
    """`clients` threads, each calling `call(i, mark)` -> (status, error, text) in a loop
    until stopped; an exception raised by `call` is recorded as that request's error."""

    def __init__(self, clients: int, call: Callable, retries: int = 0, join_s: float = 120):
        self.call, self.retries, self.join_s = call, retries, join_s
        self.outcomes: list[Outcome] = []
        self.died: list[str] = []  # tracebacks of threads that died (a bug in the caller's code)
        self.stop = threading.Event()
        self._open: dict[int, tuple[float, bool]] = {}  # client -> (started, has a token) of its open request
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        deadline = time.monotonic() + self.join_s
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def _run(self, i: int) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                for attempt in range(1 + self.retries):
                    o = self._one(i, n, attempt)
                    self.outcomes.append(o)
                    if o.ok or (o.status is not None and 400 <= o.status < 500):  # a client's error: not retried
                        break
                n += 1
        except BaseException:
            self.died.append(traceback.format_exc())

    def _one(self, i: int, n: int, attempt: int) -> Outcome:
        started = time.monotonic()
        self._open[i] = (started, False)
        try:
            status, error, text = self.call(i, lambda: self._open.__setitem__(i, (started, True)))
        except Exception as e:  # reset, refused, timed out, a body that is not what it should be
            status, error, text = None, type(e).__name__, ""
        finally:
            self._open.pop(i, None)
        return Outcome(i, n, attempt, started, time.monotonic(), status, error, text)

    # ------------------------------------------------------------------ reading the record

    def streaming(self) -> int:
        """Clients whose open request has received text."""
        return sum(1 for _, has in list(self._open.values()) if has)

    def check(self) -> None:
        """No thread died; every one ended when stopped (none hangs past its timeout)."""
        assert not self.died, self.died[0]
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"client threads still running {self.join_s}s after the stop: {alive}"
        assert self.outcomes, "no request was made"

    def requests(self) -> dict[tuple[int, int], list[Outcome]]:
        """Each request (client, n) with its attempts."""
        out: dict[tuple[int, int], list[Outcome]] = {}
        for o in sorted(self.outcomes, key=lambda o: (o.client, o.request, o.attempt)):
            out.setdefault((o.client, o.request), []).append(o)
        return out

    def success_rate(self) -> float:
        """The share of requests that succeeded within the retries (a failed request gets its
        retries even after the stop)."""
        tried = self.requests().values()
        return sum(1 for attempts in tried if attempts[-1].ok) / max(1, len(tried))

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]
