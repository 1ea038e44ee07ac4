"""A request's stream from the Generator deployment, as the ingress reads it, surviving the
loss of a Generator replica:

    gen = Generation(handle, "NAME/3", job, timeout_s=60)
    first = await gen.open()          # {"prompt_tokens"} or {"error"}; or ApiError(503)
    async for item in gen.items():    # {"deltas": [...]}, as generator.py sends them
        ...
    gen.cancel()                      # the client went away: the Generator aborts its rows

When a replica dies (SIGKILL, OOM, a lost node), Serve raises a `RayActorError` in the
caller for every request that replica had accepted, and starts a replacement. Until a
request has passed a token on, nothing of it has reached the client, so it is submitted
again: Serve's router holds the new submission until a replica (the survivor, or the
replacement once it is up) takes it. That repeats until `timeout_s` after the request
arrived; then it ends as an OpenAI-style 503, never a hang. A replica that takes a request
for a version it has yet to load says so at once ({"accepted": true}): the deadline is for
finding a replica, not for the load (a vLLM engine takes a minute or more to start), which
ends in the first message or an error. A request that already streamed
tokens is not repeated (the client would see text twice): its stream ends with the error,
which the ingress turns into an OpenAI error event that a client's retry can act on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from raylab.serve import openai_api as oa

log = logging.getLogger("ray.serve")

RETRY_PAUSE_S = 0.5  # between submissions: Serve's router needs a moment to drop a dead replica


def lost_replica(e: BaseException) -> bool:
    """Whether `e` says the replica serving the call died or became unreachable (the call
    itself may be sound), as opposed to an error the request caused."""
    from ray.exceptions import RayActorError, RayTaskError

    return isinstance(e, RayActorError) or (isinstance(e, RayTaskError) and isinstance(e.cause, RayActorError))


class Generation:
    """One request's stream from the Generator, re-submitted on a lost replica until its
    first token has been passed on (module docstring)."""

    def __init__(self, handle, version: str, job: dict, timeout_s: float, rid: str = ""):
        self.handle, self.version, self.job, self.rid = handle, version, job, rid
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.submissions = 0
        self.sent = False  # whether a token has been passed on: from then on, no re-submission
        self.ended = False  # read to its end: nothing left to cancel
        self.stream = None

    async def open(self) -> dict:
        """Submit the request; its first message ({"prompt_tokens"} or {"error"}). Raises
        ApiError(503) when no replica took it within the timeout."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._unavailable()
            self.submissions += 1
            self.stream = self.handle.options(stream=True, multiplexed_model_id=self.version).stream.remote(self.job)
            try:
                first = await asyncio.wait_for(self.stream.__anext__(), left)
                if first.get("accepted"):  # taken; the version loads first: no deadline for that
                    first = await self.stream.__anext__()
                return first
            except TimeoutError:
                self.stream.cancel()
                raise self._unavailable() from None
            except Exception as e:
                if not lost_replica(e):
                    raise
                self._lost(e)
            await asyncio.sleep(min(RETRY_PAUSE_S, max(0.0, self.deadline - time.monotonic())))

    async def items(self):
        """The request's messages after the first, re-submitting it (quietly, skipping the
        new first message) if its replica dies before a token was passed on."""
        while True:
            try:
                async for item in self.stream:
                    if any(text or count or reason for _, text, reason, count in item.get("deltas", [])):
                        self.sent = True
                    yield item
                self.ended = True
                return
            except Exception as e:
                if self.sent or not lost_replica(e):
                    raise
                self._lost(e)
            await asyncio.sleep(RETRY_PAUSE_S)
            first = await self.open()
            if "error" in first:  # e.g. the version no longer loads on the replacement
                raise oa.ApiError(first["error"]["status"], first["error"]["message"], first["error"].get("param"),
                                  first["error"].get("code"))

    def cancel(self) -> None:
        """Stop the request on its replica (a client that went away): its rows leave the batch."""
        if self.stream is not None and not self.ended:
            self.stream.cancel()

    def _lost(self, e: BaseException) -> None:
        log.warning(json.dumps({"request": self.rid, "resubmit": self.submissions, "model": self.version,
                                "lost_replica": type(e).__name__}))

    def _unavailable(self) -> oa.ApiError:
        return oa.ApiError(503, f"no Generator replica took the request within {self.timeout_s:g} s "
                                f"(serve.resubmit_timeout_s; {self.submissions} submission(s)); retry later",
                           code="unavailable")
