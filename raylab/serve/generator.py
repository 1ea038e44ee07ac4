"""The Generator deployment: one base model per replica; each registry version is loaded on
demand by `@serve.multiplexed` (LRU-bounded), verified against its registry checksums; an
adapter goes into the shared base, a full model loads on its own. `@serve.batch` gathers
requests arriving together (Serve splits batches by model id); they join that model's
running decode loop (engine.Batch), which takes newcomers between steps (continuous
batching), so the adapters of one base share a batch too.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from ray import serve

from raylab import models, registry
from raylab.errors import UserError
from raylab.serve import openai_api as oa
from raylab.serve.engine import Batch, Sampling, Sequence, eos_ids

log = logging.getLogger("ray.serve")


class Loaded:
    """One version in a replica. Serve's LRU calls `__del__` on eviction; requests still
    decoding with it hold it, so its adapter leaves the base only when the last one ends."""

    def __init__(self, version: str, model, tok, adapter: str | None, unload):
        self.version, self.model, self.tok, self.adapter = version, model, tok, adapter
        self.stop_ids = eos_ids(model, tok)
        self._unload, self._users, self._evicted, self._gone = unload, 0, False, False
        self.context = models.max_positions(getattr(model, "config", None)) or 1_000_000

    def acquire(self) -> None:
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._evicted and self._users == 0:
            self._drop()

    def __del__(self):
        self._evicted = True
        if self._users == 0:
            self._drop()

    def _drop(self) -> None:
        if not self._gone:
            self._gone = True
            self._unload(self)


@dataclass
class Job:
    """One request's choices; the decode loop puts each step's changes on `out`, then None."""

    loaded: Loaded
    seqs: list[Sequence]
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    left: int = 0

    def __post_init__(self):
        self.left = len(self.seqs)


@dataclass
class Running:
    """The continuous batch of one model object (a base shared by adapters, or a full model)."""

    batch: Batch
    waiting: list = field(default_factory=list)  # (job, choice index) not yet admitted
    owners: dict = field(default_factory=dict)  # id(sequence) -> (job, choice index)


def _prompts(loaded: Loaded, job: dict) -> list[list[int]]:
    """Token ids per prompt, rendered with the version's own chat template (as in training)."""
    out = []
    for p in job["prompts"]:
        try:
            if job["chat"]:
                msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in p]
                out.append(models.prompt_ids(loaded.tok, {"messages": msgs}, "messages"))
            else:
                out.append(models.prompt_ids(loaded.tok, {"text": p}, "prompt"))
        except UserError as e:
            raise oa.ApiError(400, str(e), "messages" if job["chat"] else "prompt") from None
        except Exception as e:  # a template that refuses this conversation (jinja raise_exception)
            raise oa.ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None
    return out


def sequences(loaded: Loaded, job: dict, limits: dict) -> tuple[list[Sequence], int]:
    """The choices to generate for a request, or ApiError(400) for an over-long prompt."""
    prompts = _prompts(loaded, job)
    longest = max(len(p) for p in prompts)
    if longest > limits["max_prompt_tokens"]:
        raise oa.ApiError(400, f"the prompt has {longest} tokens; the limit is {limits['max_prompt_tokens']} "
                               "(serve.max_prompt_tokens)", "messages" if job["chat"] else "prompt", "context_length_exceeded")
    room = loaded.context - longest
    want = job["max_tokens"] or min(limits["max_tokens"], room)
    if want > room:
        raise oa.ApiError(400, f"the prompt ({longest} tokens) plus max_tokens ({want}) exceeds the model's context of "
                               f"{loaded.context} tokens", "max_tokens", "context_length_exceeded")
    s = job["sampling"]
    seqs = []
    for p in prompts:
        for j in range(job["n"]):
            seed = None if s["seed"] is None else s["seed"] + j
            seqs.append(Sequence(p, Sampling(want, s["temperature"], s["top_p"], tuple(s["stop"]), seed, s["ignore_eos"]),
                                 adapter=loaded.adapter))
    return seqs, sum(len(p) for p in prompts)


class GeneratorBase:
    """The Generator deployment's code; `generator_deployment` adds the multiplexed loader,
    whose LRU size comes from the config."""

    def __init__(self, args: dict):
        import torch
        from ray.serve.metrics import Counter

        torch.set_num_threads(max(1, int(args["threads"])))
        self.args, self.limits = args, args["limits"]
        self.lock = threading.Lock()  # peft adapter loads/unloads vs decode steps on the shared base
        self.base, self.peft, self.store, self._names = None, None, None, itertools.count()
        if args.get("base"):
            from transformers import AutoModelForCausalLM

            self.base = AutoModelForCausalLM.from_pretrained(args["base"], dtype=getattr(torch, args["dtype"])).eval()
        self.running: dict[int, Running] = {}
        self._admit.set_max_batch_size(self.limits["max_batch_size"])
        self._admit.set_batch_wait_timeout_s(self.limits["batch_wait_timeout_s"])
        self.generated = Counter("raylab_generated_tokens", description="tokens generated by raylab serve",
                                 tag_keys=("model",))
        self.requests = Counter("raylab_requests", description="generation requests by model and outcome",
                                tag_keys=("model", "outcome"))

    async def reconfigure(self, user_config: dict) -> None:
        # Load (and verify) what the ingress will route to first, before it gets traffic.
        for version in user_config.get("preload", []):
            await self.get_model(version)

    def check_health(self) -> None:
        if self.args.get("base") and self.base is None:
            raise RuntimeError("base model not loaded")

    def _load(self, version: str) -> Loaded:
        if self.store is None:
            self.store = registry.open_store(tracking_uri=self.args["tracking_uri"])
        local = registry.fetch(self.store, version)  # refuses a changed artifact
        if self.base is not None and models.is_adapter(local) and models.base_of(local) == self.args["base"]:
            from peft import PeftModel

            name = f"v{next(self._names)}_{hashlib.sha1(version.encode()).hexdigest()[:8]}"
            with self.lock:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.base, local, adapter_name=name).eval()
                else:
                    self.peft.load_adapter(local, adapter_name=name)
            return Loaded(version, self.peft, models.load_saved_tokenizer(local), name, self._unload)
        model, tok = models.load_inference(local, dtype=self.args["dtype"])  # a full model, or another base
        return Loaded(version, model, tok, None, self._unload)

    def _unload(self, loaded: Loaded) -> None:
        if loaded.adapter is not None:
            with self.lock:
                self.peft.delete_adapter(loaded.adapter)
        loaded.model = None

    async def stream(self, job: dict):
        """Per request: first {"prompt_tokens"} or {"error"}, then {"deltas": [[index, text,
        finish_reason, tokens], ...]} as text is generated (tokens: the choice's count, sent
        with its finish)."""
        version = serve.get_multiplexed_model_id()
        try:
            loaded = await self.get_model(version)
        except UserError as e:  # a registry or integrity problem: the server's, not the request's
            self.requests.inc(tags={"model": version, "outcome": "load_error"})
            yield {"error": {"status": 500, "message": f"cannot load {version}: {e}"}}
            return
        try:
            seqs, prompt_tokens = sequences(loaded, job, self.limits)
        except oa.ApiError as e:
            self.requests.inc(tags={"model": version, "outcome": "bad_request"})
            yield {"error": {"status": e.status, "message": e.message, "param": e.param, "code": e.code}}
            return
        yield {"prompt_tokens": prompt_tokens}
        stream_wanted = job["stream"]
        job = Job(loaded, seqs)
        loaded.acquire()
        try:
            await self._admit(job)
            while (items := await job.out.get()) is not None:
                if isinstance(items, Exception):
                    raise items
                if stream_wanted:
                    yield {"deltas": items}
            if not stream_wanted:  # one message at the end: per-token messages between replicas cost more than decoding
                yield {"deltas": [[i, s.text, s.finish_reason, len(s.token_ids)] for i, s in enumerate(seqs)]}
        finally:
            for s in seqs:  # a client that went away: its rows leave the batch at the next step
                if not s.done:
                    s.finish_reason = "cancelled"
            loaded.release()
            self.generated.inc(sum(len(s.token_ids) for s in seqs), tags={"model": version})
            self.requests.inc(tags={"model": version, "outcome": "cancelled" if any(s.finish_reason == "cancelled" for s in seqs) else "ok"})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _admit(self, jobs: list[Job]) -> list[None]:
        """Requests arriving within `batch_wait_timeout_s` of each other join their model's
        running decode together (one prefill); the decode takes newcomers between steps, up
        to `serve.max_batch_size` sequences at once (continuous batching)."""
        for job in jobs:
            key = id(job.loaded.model)
            run = self.running.get(key)
            if run is None:
                run = self.running[key] = Running(Batch(job.loaded.model, job.loaded.tok, job.loaded.stop_ids))
                asyncio.get_running_loop().create_task(self._drive(key, run))
            run.waiting += [(job, i) for i in range(len(job.seqs))]
        return [None] * len(jobs)

    async def _drive(self, key: int, run: Running) -> None:
        started, steps, widest, served = time.monotonic(), 0, 0, 0
        try:
            while run.batch.seqs or run.waiting:
                room = self.limits["max_batch_size"] - len(run.batch.seqs) if (run.batch.can_join or not run.batch.seqs) else 0
                admitted, run.waiting = run.waiting[:max(room, 0)], run.waiting[max(room, 0):]
                for job, i in admitted:
                    run.owners[id(job.seqs[i])] = (job, i)

                def step(new=tuple(job.seqs[i] for job, i in admitted)):
                    with self.lock:
                        return run.batch.advance(new)

                touched = await asyncio.to_thread(step)
                steps, widest = steps + 1, max(widest, len(touched))
                changes: dict[int, tuple[Job, list]] = {}
                for seq, text in touched:
                    job, i = run.owners[id(seq)]
                    if seq.done:
                        del run.owners[id(seq)]
                        job.left -= 1
                        served += 1
                        changes.setdefault(id(job), (job, []))[1].append([i, text, seq.finish_reason, len(seq.token_ids)])
                    elif text:
                        changes.setdefault(id(job), (job, []))[1].append([i, text, None, 0])
                for job, items in changes.values():
                    job.out.put_nowait(items)
                    if job.left == 0:
                        job.out.put_nowait(None)
        except Exception as e:  # a bug: fail this batch's requests (500), keep the replica
            log.exception("decode loop failed")
            for job, _ in list(run.owners.values()) + run.waiting:
                job.out.put_nowait(e)
        finally:
            self.running.pop(key, None)
            log.info(json.dumps({"decode_loop": {"sequences": served, "steps": steps, "widest_batch": widest,
                                                 "seconds": round(time.monotonic() - started, 3)}}))


def generator_deployment(max_models: int):
    """The Generator deployment class with an LRU of `max_models` versions per replica."""

    class Generator(GeneratorBase):
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, version: str) -> Loaded:
            return await asyncio.to_thread(self._load, version)

    return serve.deployment(name="Generator")(Generator)


