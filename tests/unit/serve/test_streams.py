"""The ingress's re-submission of a request whose Generator replica died (serve/streams.py),
driven by a scripted stand-in for the Generator's handle (what a replica does per submission:
answer, die before a token, die after one, or never answer), without Ray. The real replica
kills are tests/integration/test_serve.py's; this covers the bounds: the timeout ends in an
OpenAI 503, a stream that passed a token on is never repeated, a request's own error is
never retried."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from raylab.serve import openai_api as oa
from raylab.serve import streams

FIRST = {"prompt_tokens": 3}


def delta(text: str, reason: str | None = None) -> dict:
    return {"deltas": [[0, text, reason, 1 if reason else 0]]}


class Submission:
    """One submission's stream: its messages in order; an exception is raised where it
    stands; "hang" never answers."""

    def __init__(self, script: list):
        self.script, self.cancelled = list(script), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.script:
            raise StopAsyncIteration
        step = self.script.pop(0)
        if step == "hang":
            await asyncio.sleep(3600)
        if isinstance(step, BaseException):
            raise step
        return step

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """The Generator's handle: the n-th `.stream.remote(job)` plays scripts[n]."""

    def __init__(self, *scripts: list):
        self.scripts, self.submitted = list(scripts), []
        self.stream = self

    def options(self, **kwargs):
        assert kwargs == {"stream": True, "multiplexed_model_id": "m/1"}
        return self

    def remote(self, job: dict) -> Submission:
        self.submitted.append(Submission(self.scripts[len(self.submitted)]))
        return self.submitted[-1]


async def run(handle: Handle, timeout_s: float = 5) -> tuple[dict, list[dict]]:
    gen = streams.Generation(handle, "m/1", {"prompts": ["x"]}, timeout_s)
    first = await gen.open()
    return first, [item async for item in gen.items()]


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(streams, "RETRY_PAUSE_S", 0.01)


def test_a_replica_lost_before_the_first_message_or_before_a_token_is_resubmitted():
    handle = Handle([ActorDiedError()], [FIRST, ActorUnavailableError("gone", None)],
                    [FIRST, delta("hi"), delta("!", "stop")])
    first, items = asyncio.run(run(handle))
    assert first == FIRST and items == [delta("hi"), delta("!", "stop")]  # the re-submission's first message is not repeated
    assert len(handle.submitted) == 3


def test_a_stream_that_passed_a_token_on_is_not_repeated():
    handle = Handle([FIRST, delta("hi"), ActorDiedError()], [FIRST, delta("hi"), delta("!", "stop")])

    async def main():
        gen = streams.Generation(handle, "m/1", {}, 5)
        await gen.open()
        got = []
        with pytest.raises(ActorDiedError):
            async for item in gen.items():
                got.append(item)
        return gen, got

    gen, got = asyncio.run(main())
    assert got == [delta("hi")] and gen.sent and len(handle.submitted) == 1
    assert streams.lost_replica(ActorDiedError())  # what the ingress turns into the replica_lost error event


@pytest.mark.parametrize("scripts", [[["hang"]], [[ActorDiedError()]] * 1000], ids=["never answers", "dies again and again"])
def test_no_replica_within_the_timeout_is_a_503_not_a_hang(scripts):
    handle = Handle(*scripts)
    with pytest.raises(oa.ApiError) as e:  # (a hang would be wait_for's TimeoutError instead)
        asyncio.run(asyncio.wait_for(run(handle, timeout_s=0.3), 60))
    assert e.value.status == 503 and e.value.type == "server_error" and "resubmit_timeout_s" in e.value.message
    if scripts[0] == ["hang"]:
        assert handle.submitted[0].cancelled  # the submission that never answered is withdrawn
    else:
        assert len(handle.submitted) > 1  # kept re-submitting until the deadline


def test_a_request_error_is_not_retried():
    handle = Handle([ValueError("a bug")], [FIRST, delta("never", "stop")])
    with pytest.raises(ValueError):
        asyncio.run(run(handle))
    assert len(handle.submitted) == 1
    assert not streams.lost_replica(ValueError("a bug"))  # the negative control of the classifier


def test_a_replica_that_accepted_the_request_may_load_past_the_deadline():
    """{"accepted": true} first (the version loads on that replica: a vLLM engine takes a
    minute): the deadline no longer applies, the load's first message comes later; the
    control, the same slow load without the acceptance, is a 503."""
    class Slow(Submission):
        async def __anext__(self):
            if self.script and self.script[0] is FIRST:
                await asyncio.sleep(0.5)  # the load, past the 0.3 s deadline
            return await super().__anext__()

    class SlowHandle(Handle):
        def remote(self, job: dict) -> Submission:
            self.submitted.append(Slow(self.scripts[len(self.submitted)]))
            return self.submitted[-1]

    first, items = asyncio.run(run(SlowHandle([{"accepted": True}, FIRST, delta("hi", "stop")]), timeout_s=0.3))
    assert first == FIRST and items == [delta("hi", "stop")]
    with pytest.raises(oa.ApiError) as e:
        asyncio.run(run(SlowHandle([FIRST, delta("hi", "stop")]), timeout_s=0.3))
    assert e.value.status == 503

