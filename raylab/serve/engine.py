"""The serving engine seam: what the Generator deployment asks of whatever generates tokens.

    engine = TransformersEngine(model, tok, max_batch_size=8)
    async for out in engine.submit(Request("r1", prompt_ids, Sampling(max_tokens=32))):
        print(out.text, out.finish_reason)     # new text per step; the last one has a reason
    await engine.abort("r1")                   # its stream ends with finish_reason "abort"
    await engine.load_adapter("a1", "/path/to/peft/adapter")   # then Request(..., adapter="a1")
    engine.stats()                             # {"running": 0, "waiting": 0, "submitted": 1, ...}

`Engine` is the interface; `TransformersEngine` is its one implementation today: the
continuous-batching KV-cache decode loop of decode.py, stepped by the engine itself (an
asyncio task that runs each step in a worker thread while there is work). It gathers the
requests that arrive within `batch_wait_s` of an idle engine into one prefill, and admits
newcomers between steps up to `max_batch_size` sequences, so Serve's `@serve.batch` is not
needed in front of it.

The interface follows vLLM's `AsyncLLM` so that an engine built on it is a thin adapter:
`submit` is its `generate` (an async generator per request id), `abort` its `abort`,
`load_adapter`/`unload_adapter` its `add_lora`/`remove_lora`; a request is one prompt and one
choice, as there.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from raylab.core import storage
from raylab.serve.decode import Batch, Sampling, Sequence, eos_ids

log = logging.getLogger("ray.serve")

ABORT = "abort"  # the finish_reason of an aborted request (as vLLM's)


class RequestRejected(ValueError):
    """An engine refused a request's parameters before generating (the ingress's 400): a
    constraint the transformers engine does not decode under, a schema vLLM cannot follow."""


@dataclass(frozen=True)
class Request:
    """One prompt (token ids) and one choice to generate for it."""

    request_id: str
    prompt: list[int]
    sampling: Sampling
    adapter: str | None = None  # a name given to `load_adapter`; None = the engine's model itself


@dataclass(frozen=True)
class Output:
    """A step's news for one request: its new text (maybe ""), the tokens generated so far,
    and, on its last output, why it ended ("stop" | "length" | "abort")."""

    request_id: str
    text: str
    num_tokens: int
    finish_reason: str | None = None
    # with Sampling.logprobs: one entry per new token, OpenAI's shape ({token, logprob, bytes,
    # top_logprobs}); () otherwise
    logprobs: tuple = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine(abc.ABC):
    """What generates tokens for the Generator deployment (DESIGN.md: the engine seam)."""

    @abc.abstractmethod
    def submit(self, request: Request) -> AsyncIterator[Output]:
        """Generate for `request`: an async iterator of its outputs, the last one finished.
        Closing the iterator early aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request (no-op when it has ended): its iterator ends with reason "abort"."""

    @abc.abstractmethod
    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter from `path`; requests then name it as their `adapter`."""

    @abc.abstractmethod
    async def unload_adapter(self, name: str) -> None:
        """Remove an adapter (requests still decoding with it must have ended)."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """Counters and gauges: at least running, waiting, submitted, finished, aborted."""


@dataclass
class _Tracked:
    request: Request
    seq: Sequence
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # Outputs, then an Exception on failure
    aborted: bool = False


class TransformersEngine(Engine):
    """A transformers (optionally peft) model decoding with continuous batching (decode.Batch).

    Adapters are peft adapters on this engine's model: the first wraps it in a `PeftModel`;
    a batch mixes requests of different adapters and of the model itself."""

    def __init__(self, model, tok, max_batch_size: int = 8, batch_wait_s: float = 0.0,
                 stop_ids: set[int] | None = None,
                 observer: Callable[[list[str | None], list[str | None]], None] | None = None):
        self.model, self.tok = model, tok
        # observer(running, waiting): the adapter of every row decoding and every request
        # queued, after each decode step (the Generator's batch-size and queue-depth metrics)
        self.observer = observer
        self.max_batch_size, self.batch_wait_s = max(1, int(max_batch_size)), batch_wait_s
        self.stop_ids = eos_ids(model, tok) if stop_ids is None else stop_ids
        self.lock = threading.Lock()  # decode steps vs adapter loads/unloads on the shared model
        self._on_cpu = next(model.parameters()).device.type == "cpu"
        self._batch: Batch | None = None
        self._waiting: list[_Tracked] = []
        self._live: dict[str, _Tracked] = {}  # request id -> request, until it ends
        self._task: asyncio.Task | None = None
        self._adapters: set[str] = set()
        self._counts = {"submitted": 0, "finished": 0, "aborted": 0, "steps": 0, "tokens": 0}

    # ------------------------------------------------------------------ the interface

    async def submit(self, request: Request) -> AsyncIterator[Output]:
        if request.request_id in self._live:
            raise ValueError(f"request id {request.request_id!r} is already running")
        if request.adapter is not None and request.adapter not in self._adapters:
            raise ValueError(f"no adapter {request.adapter!r} is loaded")
        for name, asked in (("response_format", request.sampling.constraint is not None),
                            ("logprobs", request.sampling.logprobs is not None)):
            if asked:  # never ignored: an answer that looks constrained is not, an empty logprobs list is wrong
                raise RequestRejected(f"{name} needs the vLLM engine (serve.engine); the transformers engine "
                                      "does not serve it")
        tracked = _Tracked(request, Sequence(list(request.prompt), request.sampling, adapter=request.adapter))
        self._live[request.request_id] = tracked
        self._waiting.append(tracked)
        self._counts["submitted"] += 1
        self._start()
        try:
            while True:
                item = await tracked.out.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not tracked.aborted and not tracked.seq.done:  # the caller stopped listening (a client that went away)
                self._abort(tracked)

    async def abort(self, request_id: str) -> None:
        tracked = self._live.get(request_id)
        if tracked is not None and not tracked.aborted and not tracked.seq.done:
            self._abort(tracked)

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.to_thread(self._load_adapter, name, path)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._unload_adapter, name)

    def stats(self) -> dict:
        """running/waiting: requests decoding/queued now; submitted, finished (ended by a stop,
        the end of turn or max_tokens), aborted; steps: decode steps; tokens: generated by the
        finished requests; adapters: the names loaded."""
        return {"running": len(self._batch.seqs) if self._batch is not None else 0, "waiting": len(self._waiting),
                "adapters": sorted(self._adapters)} | self._counts

    # ------------------------------------------------------------------ adapters

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self.lock, storage.plain_dir(path) as src:  # a sealed adapter opened in memory
            if hasattr(self.model, "peft_config"):
                try:
                    self.model.load_adapter(src, adapter_name=name)
                except Exception:
                    # peft injects the adapter's layers before loading its weights: a broken
                    # adapter (a size mismatch) would stay in the model, one more per retry
                    if name in self.model.peft_config:
                        self.model.delete_adapter(name)
                    raise
            else:
                self.model = PeftModel.from_pretrained(self.model, src, adapter_name=name).eval()
                if self._batch is not None:  # a running batch decodes through the wrapper from its next step
                    self._batch.model, self._batch.peft = self.model, True
            self._adapters.add(name)

    def _unload_adapter(self, name: str) -> None:
        with self.lock:
            if name in self._adapters:
                self._adapters.discard(name)
                self.model.delete_adapter(name)

    # ------------------------------------------------------------------ stepping

    def _observe(self, batch: Batch | None) -> None:
        if self.observer is None:
            return
        try:  # metrics are never worth a failed batch
            self.observer([seq.adapter for seq in batch.seqs] if batch is not None else [],
                          [t.seq.adapter for t in self._waiting])
        except Exception:
            log.exception("engine observer failed")

    def _abort(self, tracked: _Tracked) -> None:
        """Mark it finished; a running row leaves the batch at the next step, a waiting one now."""
        tracked.aborted, tracked.seq.finish_reason = True, ABORT
        self._counts["aborted"] += 1
        if tracked in self._waiting:
            self._waiting.remove(tracked)
        self._live.pop(tracked.request.request_id, None)
        tracked.out.put_nowait(Output(tracked.request.request_id, "", len(tracked.seq.token_ids), ABORT))

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        """Step while there is work: admit waiting requests between steps (continuous batching)."""
        started, steps, widest, served = time.monotonic(), 0, 0, 0
        batch = self._batch = Batch(self.model, self.tok, self.stop_ids)
        owners: dict[int, _Tracked] = {}
        try:
            if self.batch_wait_s > 0 and len(self._waiting) < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_s)  # let requests arriving together share one prefill
            while batch.seqs or self._waiting:
                room = self.max_batch_size - len(batch.seqs) if (batch.can_join or not batch.seqs) else 0
                admitted, self._waiting = self._waiting[:max(room, 0)], self._waiting[max(room, 0):]
                for t in admitted:
                    owners[id(t.seq)] = t

                def step(new=tuple(t.seq for t in admitted)):
                    with self.lock:
                        return batch.advance(new)

                if self._on_cpu:
                    # On CPU the step runs on this loop's thread and the loop then lets the streams
                    # run: a hop to a worker thread per step costs two wake-ups, and the forward
                    # (GIL-heavy for a small model) and the streams' messages then contend for the
                    # GIL on every token (bench_serve_vllm's c1 exploration: 205 -> 373 tokens/s
                    # with stream_interval_ms, 257 with the interval alone). On a GPU the forward
                    # mostly waits for kernels without the GIL, so a thread lets streams overlap it.
                    touched = step()
                    await asyncio.sleep(0)
                else:
                    touched = await asyncio.to_thread(step)
                steps, widest = steps + 1, max(widest, len(touched))
                self._counts["steps"] += 1
                self._observe(batch)
                for seq, text in touched:
                    t = owners.get(id(seq))
                    if t is None:
                        continue
                    if t.aborted:  # its final output went out with the abort
                        del owners[id(seq)]
                        continue
                    if seq.done:
                        del owners[id(seq)]
                        self._live.pop(t.request.request_id, None)
                        self._counts["finished"] += 1
                        self._counts["tokens"] += len(seq.token_ids)
                        served += 1
                        t.out.put_nowait(Output(t.request.request_id, text, len(seq.token_ids), seq.finish_reason))
                    elif text:
                        t.out.put_nowait(Output(t.request.request_id, text, len(seq.token_ids)))
        except Exception as e:  # a bug: fail this batch's requests, keep the engine
            log.exception("decode loop failed")
            failed, self._waiting = list(owners.values()) + self._waiting, []
            for t in failed:
                self._live.pop(t.request.request_id, None)
                t.out.put_nowait(e)
        finally:
            self._batch = None
            self._observe(None)  # idle: nothing decoding, nothing queued
            log.info(json.dumps({"decode_loop": {"sequences": served, "steps": steps, "widest_batch": widest,
                                                 "seconds": round(time.monotonic() - started, 3)}}))
