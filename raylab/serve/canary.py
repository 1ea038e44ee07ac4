"""The canary rollout's pure parts: who goes to the candidate, what a version's online
metrics are, and the decision (docs/serving.md, "Canary rollout").

    canary_share("user-42", 10.0, salt="acme/3")     # True for about 10 % of keys, always the same ones
    snap = Tally().add(200, 0.12, 15).snapshot()       # per version: requests, error rate, p99, ...
    decide(snap, thresholds, elapsed_s=40, window_s=30) # Decision("promote" | "rollback" | "wait", why)

No Ray, no I/O: the controller (rollout.py) feeds these and acts on the decision, the Ingress
calls `canary_share` for each production request.

The rule, in order:
1. fewer than `min_requests` answered by the candidate: wait; past `window_s * patience`
   still that few, roll back (a rollout that cannot be judged does not ship);
2. any threshold broken (error rate, p99 latency, tokens per response, and the mean
   feedback once `min_feedback_count` ratings came in): roll back at once, without waiting
   for the window to end (a bad candidate gets as little traffic as possible);
3. all hold and the window has passed: promote; else wait.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import deque
from dataclasses import dataclass, field

PROMOTE, ROLLBACK, WAIT = "promote", "rollback", "wait"
KEEP_LATENCIES = 5000  # the p99 is over the latest this many requests of a version


def canary_share(key: str, percent: float, salt: str) -> bool:
    """Whether a request keyed `key` (its `user` field or API key) goes to the candidate:
    a stable hash into 10,000 buckets, so one user always lands on the same side while the
    share holds; the salt (the candidate) reshuffles who is in the share for the next rollout."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < round(percent * 100)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '10m', '1h', '1.5h' or plain seconds ('45') -> seconds; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m or float(m[1]) <= 0:
        raise ValueError(f"{text!r} is not a duration: use a positive number with s, m, h or d (e.g. 10m)")
    return float(m[1]) * _UNITS[m[2] or "s"]


@dataclass
class Tally:
    """One version's online metrics since the rollout started (kept by the controller)."""

    requests: int = 0
    errors: int = 0
    tokens: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=KEEP_LATENCIES))
    feedback_count: int = 0
    feedback_sum: float = 0.0

    def add(self, status: int, latency_s: float, tokens: int) -> Tally:
        """One answered request; a 5xx is an error (a 4xx is the client's, not the version's)."""
        self.requests += 1
        self.errors += status >= 500
        self.tokens += tokens
        self.latencies.append(latency_s)
        return self

    def rate(self, score: float) -> Tally:
        """One user rating in [0, 1] (POST /v1/feedback)."""
        self.feedback_count += 1
        self.feedback_sum += score
        return self

    def snapshot(self) -> dict:
        """The numbers the decision reads (and `raylab deploy --status` shows)."""
        ok = self.requests - self.errors
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": self.errors / self.requests if self.requests else 0.0,
                "p99_latency_ms": percentile(list(self.latencies), 99) * 1000 if self.latencies else 0.0,
                "tokens_per_response": self.tokens / ok if ok else 0.0,
                "feedback_count": self.feedback_count,
                "feedback": self.feedback_sum / self.feedback_count if self.feedback_count else None}

    def to_dict(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "tokens": self.tokens,
                "latencies": list(self.latencies), "feedback_count": self.feedback_count,
                "feedback_sum": self.feedback_sum}

    @classmethod
    def from_dict(cls, d: dict) -> Tally:
        return cls(d["requests"], d["errors"], d["tokens"], deque(d["latencies"], maxlen=KEEP_LATENCIES),
                   d["feedback_count"], d["feedback_sum"])


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (no interpolation: a p99 is a latency some request had)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Decision:
    action: str  # PROMOTE | ROLLBACK | WAIT
    reason: str


def breaches(snap: dict, t: dict) -> list[str]:
    """The thresholds `snap` (a Tally.snapshot) breaks, each as a line naming its config key."""
    out = []
    if snap["error_rate"] > t["max_error_rate"]:
        out.append(f"error rate {snap['error_rate']:.3f} > serve.canary.max_error_rate {t['max_error_rate']}")
    if t.get("max_p99_latency_ms") is not None and snap["p99_latency_ms"] > t["max_p99_latency_ms"]:
        out.append(f"p99 latency {snap['p99_latency_ms']:.0f} ms > serve.canary.max_p99_latency_ms "
                   f"{t['max_p99_latency_ms']}")
    if t.get("max_tokens_per_response") is not None and snap["tokens_per_response"] > t["max_tokens_per_response"]:
        out.append(f"tokens per response {snap['tokens_per_response']:.1f} > serve.canary.max_tokens_per_response "
                   f"{t['max_tokens_per_response']}")
    if (t.get("min_feedback") is not None and snap["feedback_count"] >= t["min_feedback_count"]
            and snap["feedback"] < t["min_feedback"]):
        out.append(f"mean feedback {snap['feedback']:.2f} < serve.canary.min_feedback {t['min_feedback']} "
                   f"({snap['feedback_count']} ratings)")
    return out


def decide(candidate: dict, thresholds: dict, elapsed_s: float, window_s: float) -> Decision:
    """The rollout's next step from the candidate's snapshot (see the module docstring)."""
    need = thresholds["min_requests"]
    if candidate["requests"] < need:
        if elapsed_s >= window_s * thresholds["patience"]:
            return Decision(ROLLBACK, f"only {candidate['requests']} candidate requests (serve.canary.min_requests "
                                      f"{need}) after {elapsed_s:.0f}s (window x serve.canary.patience)")
        return Decision(WAIT, f"{candidate['requests']}/{need} candidate requests")
    broken = breaches(candidate, thresholds)
    if broken:
        return Decision(ROLLBACK, "; ".join(broken))
    if elapsed_s >= window_s:
        return Decision(PROMOTE, f"held every threshold for {elapsed_s:.0f}s over {candidate['requests']} requests")
    return Decision(WAIT, f"holding; {window_s - elapsed_s:.0f}s of the window left")
