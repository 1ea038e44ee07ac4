"""A streamed response's tokens leave the Generator at most every serve.stream_interval_ms, each
still its own delta (so the ingress sends one event per token), the first and the finish at
once; with the interval 0 every decode step is its own message (the control). The served path
end to end is tests/integration/test_serve.py's streaming tests.

    pytest tests/unit/serve/test_stream_interval.py
"""

from __future__ import annotations

import asyncio

import pytest

from raylab.serve import generator
from raylab.serve.engine import Output, Request, Sampling

TOKENS = 30
STEP_S = 0.002  # a small model's decode step


class _Engine:
    async def submit(self, request: Request):
        for k in range(TOKENS):
            await asyncio.sleep(STEP_S)
            yield Output(request.request_id, f"t{k} ", k + 1, "length" if k == TOKENS - 1 else None)


class _Loaded:
    engine, tok = _Engine(), None

    def release(self) -> None:
        pass


class _Counter:
    def inc(self, *args, **kwargs) -> None:
        pass


class _Replica(generator.GeneratorBase):
    """The Generator's stream() without Serve or a model: one loaded version, a scripted engine."""

    def __init__(self, interval_ms: float):
        self._live, self.vllm_base = {"m/1": _Loaded()}, None
        self.limits = {"stream_interval_ms": interval_ms}
        self.requests = self.generated = _Counter()

    async def _acquired(self, version: str):
        return self._live[version]


def _messages(monkeypatch, interval_ms: float, logprobs=None, times: list | None = None) -> list[dict]:
    monkeypatch.setattr(generator.serve, "get_multiplexed_model_id", lambda: "m/1")
    sampling = Sampling(TOKENS, 0.0, 1.0, (), None, True)
    monkeypatch.setattr(generator.choices, "requests", lambda loaded, job, limits: ([Request("r-0", [1], sampling)], 3))
    job = {"stream": True, "sampling": {"constraint": None, "logprobs": logprobs}}

    async def collect():
        out = []
        async for m in _Replica(interval_ms).stream(job):
            out.append(m)
            if times is not None:
                times.append(asyncio.get_running_loop().time())
        return out

    return asyncio.run(collect())


def _deltas(messages: list[dict]) -> list[list]:
    assert messages[0] == {"prompt_tokens": 3}
    return [d for m in messages[1:] for d in m["deltas"]]


def test_tokens_are_gathered_into_fewer_messages_each_its_own_delta(monkeypatch):
    times: list[float] = []
    messages = _messages(monkeypatch, interval_ms=40, times=times)
    deltas = _deltas(messages)
    assert [d[1] for d in deltas] == [f"t{k} " for k in range(TOKENS)]  # every token, in order, one delta each
    assert deltas[-1][2] == "length" and deltas[-1][3] == TOKENS
    assert len(messages[1]["deltas"]) == 1  # the first token leaves at once (time to first token)
    assert len(messages) - 1 < TOKENS, [len(m["deltas"]) for m in messages[1:]]
    # between the first token's message and the finish's, the messages are >= 40 ms apart
    # (however slow the machine: a wait never ends early); the finish leaves when it is ready
    gaps = [b - a for a, b in zip(times[1:-1], times[2:-1], strict=False)]
    assert all(g >= 0.039 for g in gaps), gaps


def test_interval_zero_sends_every_step(monkeypatch):  # the control: the gathering is the interval's
    messages = _messages(monkeypatch, interval_ms=0)
    assert [len(m["deltas"]) for m in messages[1:]] == [1] * TOKENS
    assert [d[1] for d in _deltas(messages)] == [f"t{k} " for k in range(TOKENS)]


@pytest.mark.parametrize("logprobs", [{"top": 0}])
def test_logprobs_keep_one_step_per_message(monkeypatch, logprobs):
    # a choice's logprobs ride with its first delta of a message: aligned only at one step each
    messages = _messages(monkeypatch, interval_ms=40, logprobs=logprobs)
    assert [len(m["deltas"]) for m in messages[1:]] == [1] * TOKENS
