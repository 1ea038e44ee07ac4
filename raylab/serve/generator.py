"""The Generator deployment: one base model per replica; each registry version is loaded on
demand by `@serve.multiplexed` (LRU-bounded), verified against its registry checksums; an
adapter goes into the base model's engine, a full model gets an engine of its own. Requests
go to their version's engine (engine.Engine), one engine request per choice; the engine
batches arrivals, so the adapters of one base share a batch too.

Which engine (serve.engine): vLLM's (vllm_engine.VllmEngine) for every version it can serve
when it is installed, raylab's TransformersEngine for the rest (DoRA, hybrid, ranks vLLM
refuses, head sizes its CPU attention lacks, a tokenizer other than the base's), decided per
version when it loads and logged; with `transformers` always the latter.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
from collections import Counter as Tally

from ray import serve

from raylab import models, registry
from raylab.errors import UserError
from raylab.serve import choices, tools, vllm_engine
from raylab.serve import openai_api as oa
from raylab.serve.engine import (
    Engine,
    Output,
    Request,
    RequestRejected,
    TransformersEngine,
)
from raylab.serve.metrics import Metrics, version_tags

log = logging.getLogger("ray.serve")  # the replica's log, as the Ingress's


class Loaded:
    """One version in a replica: its engine, tokenizer and adapter name, loaded once however
    many hold it. Holders are Serve's LRU (through a `Held`, one per LRU entry) and an operator's
    pin (`raylab deploy --load`); requests decoding with it are its users. It leaves the engine
    when nothing holds it and its last request has ended, never while one still decodes."""

    def __init__(self, version: str, engine: Engine, tok, adapter: str | None, unload):
        self.version, self.engine, self.tok, self.adapter = version, engine, tok, adapter
        self._unload, self._users, self._holders, self._gone = unload, 0, 0, False
        self._lock = threading.Lock()  # Serve's LRU lets go from an executor thread
        model = getattr(engine, "model", None)
        self.context = (getattr(engine, "max_model_len", None) or models.max_positions(getattr(model, "config", None))
                        or 1_000_000)

    @property
    def gone(self) -> bool:
        return self._gone

    def hold(self) -> bool:
        """One more holder; False if it already left the engine (the caller loads it again)."""
        return self._add("_holders")

    def let_go(self) -> None:
        self._drop_one("_holders")

    def acquire(self) -> bool:
        """One more request decoding with it; False if it already left the engine."""
        return self._add("_users")

    def release(self) -> None:
        self._drop_one("_users")

    def _add(self, counter: str) -> bool:
        with self._lock:
            if not self._gone:
                setattr(self, counter, getattr(self, counter) + 1)
            return not self._gone

    def _drop_one(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) - 1)
            drop = self._holders == 0 and self._users == 0 and not self._gone
            self._gone = self._gone or drop
        if drop:
            self._unload(self)


class Held:
    """What Serve's multiplexed LRU keeps for a version: one hold on its `Loaded`. Serve calls
    `__del__` on eviction (then the garbage collector may call it again: once counts)."""

    def __init__(self, loaded: Loaded):
        self.loaded, self._released = loaded, False

    def __del__(self):
        if not self._released:
            self._released = True
            self.loaded.let_go()


class GeneratorBase:
    """The Generator deployment's code; `generator_deployment` adds the multiplexed loader,
    whose LRU size comes from the config."""

    def __init__(self, args: dict):
        import torch
        from ray.serve.metrics import Counter

        torch.set_num_threads(max(1, int(args["threads"])))
        self.args, self.limits = args, args["limits"]
        self.base, self.base_engine, self.store, self._names = None, None, None, itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None  # the replica's, where engines run
        self._pending: set[asyncio.Future] = set()
        # the versions in this replica's engines, whoever holds them (Serve's LRU, a pin)
        self._live: dict[str, Loaded] = {}
        self._loading: dict[str, asyncio.Future] = {}  # one load per version, whoever asks
        # serve.engine (absent from apps deployed before it: transformers); vLLM's reason when not used
        self.engine_choice, self.vllm_base, self._vllm_vocab = args.get("engine", "transformers"), None, None
        self._no_vllm: str | None | bool = False  # False: not asked yet
        if self.engine_choice == "vllm" and self.no_vllm:
            raise RuntimeError(f"serve.engine is vllm but vLLM does not import here ({self.no_vllm}); install it "
                               "(scripts/install.sh) or set serve.engine: auto")
        parser = (args.get("vllm") or {}).get("tool_parser")
        if parser and not self.no_vllm:  # a wrong name fails the deploy (its status says why), not each request
            tools.check_parser(parser)
        if args.get("base"):  # the adapters' shared base: weights only, each adapter brings its tokenizer
            self._start_base(args["base"])
        self.generated = Counter("raylab_generated_tokens", description="tokens generated by raylab serve",
                                 tag_keys=("model",))
        self.requests = Counter("raylab_requests", description="generation requests by model and outcome",
                                tag_keys=("model", "outcome"))
        # per-version series (metrics.py): loads, evictions, and each engine's batch and queue
        self.metrics = Metrics(["batch_size", "queue_depth", "running", "adapter_loads", "adapter_evictions"])
        self._adapter_versions: dict[str, str] = {}  # engine adapter name -> registry version
        self._observed: set[str] = set()  # versions whose gauges are non-zero
        self._pinned: dict[str, Loaded] = {}  # operator-loaded versions (`raylab deploy --load`), besides the LRU

    async def reconfigure(self, user_config: dict) -> None:
        # Load (and verify) what the ingress will route to first, before it gets traffic.
        # The routed version must load (a replica that cannot serve it is unfit), but a
        # canary's candidate, listed after it, may fail: raising here has Serve stop the
        # replica and start new ones with the same user_config, so one broken candidate took
        # every replica down with production's traffic (examples/delivery/canary_demo.py saw
        # 985 of 1,718 requests fail, nearly all outside the canary's share). Kept up, the
        # replica answers the candidate's share with 500s, which the controller rolls back.
        target, *candidates = user_config.get("preload", []) or [None]
        if target is not None:
            await self.get_model(target)
        for version in candidates:
            try:
                await self.get_model(version)
            except Exception:
                log.exception(f"could not preload the canary candidate {version}; its requests will fail")
        await self._repin(user_config.get("pinned", []))

    async def _repin(self, wanted: list[str]) -> None:
        """Hold the operator's loaded versions (`pinned`, serve/load.py) on this replica and let
        go of the others. A version that fails to load is logged, not raised: the service
        verified it before asking, and raising would stop replicas serving production."""
        for version in [v for v in self._pinned if v not in wanted]:
            self._pinned.pop(version).let_go()
            log.info(f"unloaded {version} (operator)")
        for version in [v for v in wanted if v not in self._pinned]:
            try:
                self._pinned[version] = await self._holding(version)
            except Exception:
                log.exception(f"could not load {version} for the operator; requests load it on demand")
                continue
            log.info(f"loaded {version} (operator): kept on this replica until unloaded")

    async def _holding(self, version: str) -> Loaded:
        """The version's Loaded with one more hold: the one in the engine if any (never a second
        copy), else loaded now, once however many callers ask at the same time."""
        while True:
            found = self._live.get(version)
            if found is not None and found.hold():
                return found
            if version not in self._loading:
                self._loading[version] = task = asyncio.ensure_future(self._load(version))
                task.add_done_callback(lambda _: self._loading.pop(version, None))
            await asyncio.shield(self._loading[version])  # then hold it (it may have left meanwhile)

    @property
    def no_vllm(self) -> str | None:
        """Why this replica does not use vLLM at all (None: it may), asked once and only when a
        model it could run turns up: importing vLLM costs seconds and memory per replica."""
        if self._no_vllm is False:
            self._no_vllm = ("serve.engine is transformers" if self.engine_choice == "transformers"
                             else vllm_engine.available())
        return self._no_vllm

    def _why_not_vllm(self, local: str) -> str | None:
        """Why vLLM will not run the model in `local` (None: it will)."""
        if self.engine_choice == "transformers":
            return "serve.engine is transformers"
        return "; ".join(vllm_engine.model_dir_problems(local)) or self.no_vllm

    def _start_base(self, base: str) -> None:
        """The base's engine: vLLM when it is on and can run the base, else the torch model
        for the transformers engine (also loaded later, for a version vLLM cannot serve)."""
        local = models.resolve(base)
        why = self._why_not_vllm(local)
        if why is None:
            self.vllm_base = self._vllm(local, lora=True, version=None)
            self._vllm_vocab = models.load_saved_tokenizer(local).get_vocab()
            return
        log.info(f"the base {base} on the transformers engine: {why}")
        self.base = models.load(base, dtype=self.args["dtype"], with_tokenizer=False).model

    def _vllm(self, model_dir: str, lora: bool, version: str | None) -> vllm_engine.VllmEngine:
        """A vLLM engine; `version`: the one a full model's engine serves (None: the base's,
        whose requests name their adapters)."""
        v = self.args.get("vllm") or {}
        settings = vllm_engine.VllmSettings(
            dtype=self.args["dtype"], max_model_len=v.get("max_model_len"), max_loras=v.get("max_loras", 4),
            max_cpu_loras=self.limits.get("max_adapters_per_replica", 4) + 4, max_lora_rank=v.get("max_lora_rank", 64),
            max_num_seqs=v.get("max_num_seqs", 64), kv_cache_gb=v.get("kv_cache_gb", 1.0),
            gpu_memory_utilization=v.get("gpu_memory_utilization", 0.85),
            tensor_parallel_size=v.get("tensor_parallel_size", 1), enforce_eager=v.get("enforce_eager", False),
            threads=max(1, int(self.args["threads"])))
        log.info(f"starting vLLM on {model_dir}: {settings}")
        engine = vllm_engine.VllmEngine(model_dir, settings, lora=lora)
        engine.observer = lambda running, waiting: self._observe(engine, version, running, waiting)
        return engine

    def check_health(self) -> None:
        if self.args.get("base") and self.base is None and self.vllm_base is None:
            raise RuntimeError("base model not loaded")

    def __del__(self):
        # Serve calls this when it stops a replica: vLLM's engine-core processes go with it
        # (getattr: an __init__ that failed early leaves neither set, and this still runs)
        for engine in [getattr(self, "vllm_base", None), *(one.engine for one in getattr(self, "_live", {}).values())]:
            if isinstance(engine, vllm_engine.VllmEngine):
                engine.shutdown()

    def stats(self) -> dict:
        """This replica's load, for operators and autoscaling checks (through a handle:
        `serve.get_deployment_handle("Generator", "raylab").stats.remote()`): its replica id,
        the versions loaded, its engines' sequences decoding (`running`, the batch's rows) and
        queued (`waiting`), and their counts of requests submitted, finished and aborted."""
        loaded = {v: one for v, one in list(self._live.items()) if not one.gone}
        engines = {id(one.engine): one.engine for one in loaded.values()}
        for engine in (self.base_engine, self.vllm_base):
            if engine is not None:
                engines[id(engine)] = engine
        counts = [e.stats() for e in engines.values()]
        return {"replica": serve.get_replica_context().replica_id.unique_id, "versions": sorted(loaded),
                "pinned": sorted(self._pinned),
                "engines": {v: "vllm" if isinstance(one.engine, vllm_engine.VllmEngine) else "transformers"
                            for v, one in loaded.items()},
                **{k: sum(c[k] for c in counts) for k in ("running", "waiting", "submitted", "finished", "aborted")}}

    def _engine(self, model, tok, version: str | None = None) -> Engine:
        """An engine; `version`: the one a full model's engine serves (its rows have no adapter)."""
        engine = TransformersEngine(model, tok, self.limits["max_batch_size"], self.limits["batch_wait_timeout_s"])
        engine.observer = lambda running, waiting: self._observe(engine, version, running, waiting)
        return engine

    def _observe(self, engine: Engine, version: str | None, running: list, waiting: list) -> None:
        """After an engine's decode step: its batch size for each version with rows in it,
        and each version's rows decoding and requests queued (gauges; a version that left
        the engine is set back to 0)."""
        def named(adapters):
            return Tally(self._adapter_versions.get(a, "") if a is not None else (version or "") for a in adapters)

        rows, queued = named(running), named(waiting)
        now = (set(rows) | set(queued)) - {""}  # "": the base model's own rows, no version to name
        for v in now & set(rows):
            self.metrics.observe("batch_size", len(running), version_tags(v))
        mine = self._engine_versions(engine, version) | {v for v in self._observed if v not in self._live}  # + gone ones
        for v in now | (self._observed & mine):
            self.metrics.set("running", rows.get(v, 0), version_tags(v))
            self.metrics.set("queue_depth", queued.get(v, 0), version_tags(v))
        self._observed = (self._observed - mine) | now

    def _engine_versions(self, engine: Engine, version: str | None) -> set[str]:
        """The versions one engine serves: a full model's own, or the adapters loaded into this
        base engine (a replica may hold two: vLLM's and the transformers engine's)."""
        if version is not None:
            return {version}
        return {v for v, one in list(self._live.items()) if one.engine is engine and one.adapter is not None}

    async def _load(self, version: str) -> Loaded:
        """Load a version into an engine (callers go through `_holding`, which loads each once)."""
        self.loop = asyncio.get_running_loop()
        if self.store is None and models.is_registry_ref(version):  # a plain model needs no registry
            self.store = await asyncio.to_thread(registry.open_store, tracking_uri=self.args["tracking_uri"])
        local = await asyncio.to_thread(models.locate, version, self.store)  # refuses a changed artifact
        kind, base = models.identify(local)
        if self.args.get("base") and kind == "adapter" and base == self.args["base"]:
            tok = await asyncio.to_thread(models.load_saved_tokenizer, local)
            engine = await self._adapter_engine(version, local, tok)
            name = f"v{next(self._names)}_{hashlib.sha1(version.encode()).hexdigest()[:8]}"
            await engine.load_adapter(name, local)
            self._adapter_versions[name] = version
            self._live[version] = found = Loaded(version, engine, tok, name, self._unload)
            self.metrics.inc("adapter_loads", version_tags(version))
            return found
        # a full model, or another base
        why = await asyncio.to_thread(self._why_not_vllm, local)
        if why is None:
            engine = await asyncio.to_thread(self._vllm, local, False, version)
            tok = await asyncio.to_thread(models.load_saved_tokenizer, local)
        else:
            loaded = await asyncio.to_thread(models.load, local, dtype=self.args["dtype"])
            engine, tok = self._engine(loaded.model, loaded.tokenizer, version), loaded.tokenizer
        log.info(f"{version}: {'vLLM' if why is None else 'transformers engine'}{'' if why is None else f' ({why})'}")
        self._live[version] = found = Loaded(version, engine, tok, None, self._unload)
        self.metrics.inc("adapter_loads", version_tags(version))
        return found

    async def _adapter_engine(self, version: str, local: str, tok) -> Engine:
        """The base's engine for this adapter: vLLM's when it can serve it, else the transformers
        engine (its base loaded now if vLLM had it alone), with the reason logged."""
        if self.vllm_base is not None:
            problems = vllm_engine.lora_problems(local)
            if tok.get_vocab() != self._vllm_vocab:
                problems.append("its tokenizer's vocabulary is not the base's")
            if not problems:
                log.info(f"{version}: vLLM")
                return self.vllm_base
            log.info(f"{version}: transformers engine (vLLM cannot serve it: {'; '.join(problems)})")
        if self.base is None:
            self.base = await asyncio.to_thread(lambda: models.load(self.args["base"], dtype=self.args["dtype"],
                                                                    with_tokenizer=False).model)
        if self.base_engine is None:  # decodes with the first adapter's tokenizer, as the batch always did
            self.base_engine = self._engine(self.base, tok)
        return self.base_engine

    def _unload(self, loaded: Loaded) -> None:
        """Called once nothing holds it and no request uses it: from the replica's loop (a
        request's end, an unpin) or Serve's eviction thread."""
        if self._live.get(loaded.version) is loaded:
            del self._live[loaded.version]
        self.metrics.inc("adapter_evictions", version_tags(loaded.version))
        if loaded.adapter is not None:
            self._adapter_versions.pop(loaded.adapter, None)
            self._spawn(loaded.engine.unload_adapter(loaded.adapter))
        elif isinstance(loaded.engine, vllm_engine.VllmEngine):  # a full model's own engine: its process ends
            loaded.engine.shutdown()
        loaded.engine = None

    def _spawn(self, coro) -> None:
        """Run an engine call on the replica's loop, from that loop or from another thread."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not None and here is self.loop:
            task = here.create_task(coro)
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def stream(self, job: dict):
        """Per request: first {"prompt_tokens"} or {"error"}, then {"deltas": [[index, text,
        finish_reason, tokens], ...]} as text is generated (tokens: the choice's count, sent
        with its finish). Before all, {"accepted": True} when the version is yet to load here
        (streams.Generation's deadline is for finding a replica, not for a load)."""
        version = serve.get_multiplexed_model_id()
        if version not in self._live:
            yield {"accepted": True}
        try:
            loaded = await self._acquired(version)  # this request is a user now: nothing unloads it under us
        except registry.IntegrityError as e:
            # 409 Conflict, not a 5xx: the request is valid and the server healthy, but the
            # version it names conflicts with its own registration (the artifact no longer
            # matches the checksums recorded then). A 5xx would have clients and load balancers
            # retry, and count a healthy replica as failing; no retry can succeed until the
            # version is registered again, which the message says.
            self.requests.inc(tags={"model": version, "outcome": "integrity_error"})
            yield {"error": {"status": 409, "message": f"cannot load {version}: {e}", "param": "model",
                             "code": "model_integrity_error"}}
            return
        except UserError as e:  # a registry problem (unreachable store, deleted version): the server's
            self.requests.inc(tags={"model": version, "outcome": "load_error"})
            yield {"error": {"status": 500, "message": f"cannot load {version}: {e}"}}
            return
        try:
            reqs, prompt_tokens = choices.requests(loaded, job, self.limits)
        except oa.ApiError as e:
            loaded.release()
            self.requests.inc(tags={"model": version, "outcome": "bad_request"})
            yield {"error": {"status": e.status, "message": e.message, "param": e.param, "code": e.code}}
            return
        engine, stream_wanted = loaded.engine, job["stream"]
        texts, reasons, counts = [""] * len(reqs), [None] * len(reqs), [0] * len(reqs)
        # a choice's logprobs entries not sent yet: they ride with its next delta (a token may
        # add no text, a finish always sends one), all of them in the one message without streaming
        logprobs: list[list] = [[] for _ in reqs]
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, req: Request) -> None:
            try:
                async for out in engine.submit(req):
                    merged.put_nowait((i, out))
            except Exception as e:  # re-raised by the request below
                merged.put_nowait((i, e))

        pumps: list[asyncio.Task] = []
        outcome = None
        try:
            pumps = [asyncio.get_running_loop().create_task(pump(i, r)) for i, r in enumerate(reqs)]
            early = []
            if job["sampling"]["constraint"] is not None:
                # vLLM checks a schema when it takes the request: a constrained response starts
                # at its first output, so a schema it cannot follow is a 400, not a broken stream
                early = [await merged.get()]
                if isinstance(early[0][1], RequestRejected):
                    outcome = "bad_request"
                    yield {"error": {"status": 400, "message": str(early[0][1]),
                                     "param": job["constraint_param"], "code": "invalid_value"}}
                    return
            yield {"prompt_tokens": prompt_tokens}
            left, loop = len(reqs), asyncio.get_running_loop()
            # A streamed response's news leaves at most every `interval` seconds (serve.stream_interval_ms),
            # the first token and a finish at once: each message is a Ray object passed on by the
            # ingress and the proxy, which cost more CPU than a small model's decode step
            # (bench_serve_vllm at c1: 2-3x the time per token with a message per step). The
            # ingress still sends one event per delta, so clients see the same events.
            # (Not with logprobs: a message's entries of a choice ride with its first delta, so
            # they stay aligned with their tokens only one step per message.)
            wants_logprobs = bool(job["sampling"].get("logprobs"))
            interval = self.limits.get("stream_interval_ms", 0) / 1000 if stream_wanted and not wants_logprobs else 0
            last = None  # when the last message left
            while left:
                news = early or [await merged.get()]
                early = []
                now_or_never = last is None or isinstance(news[0][1], Exception) or news[0][1].finished
                wait = 0.0 if now_or_never else last + interval - loop.time()
                await asyncio.sleep(max(wait, 0))  # news of the same step (or interval), into one message
                while not merged.empty():
                    news.append(merged.get_nowait())
                items = []
                for i, out in news:
                    if isinstance(out, Exception):
                        raise out
                    items.append(self._item(i, out, texts, reasons, counts))
                    logprobs[i].extend(out.logprobs)
                    left -= out.finished
                items = [item for item in items if item is not None]
                if stream_wanted and items:
                    last = loop.time()
                    yield {"deltas": items} | self._logprobs(logprobs, [item[0] for item in items])
            if not stream_wanted:  # one message at the end: per-token messages between replicas cost more than decoding
                yield ({"deltas": [[i, texts[i], reasons[i], counts[i]] for i in range(len(reqs))]}
                       | self._logprobs(logprobs, range(len(reqs)))
                       | tools.parsed(job.get("tool_call"), loaded.tok, job.get("tools"), texts, reasons))
        finally:
            cancelled = any(r is None for r in reasons)
            for req, reason in zip(reqs, reasons, strict=True):  # a client that went away: its rows leave the batch
                if reason is None and pumps:
                    self._spawn(engine.abort(req.request_id))
            for p in pumps:
                p.cancel()
            loaded.release()
            count_tokens(self.generated, sum(counts), version)
            self.requests.inc(tags={"model": version, "outcome": outcome or ("cancelled" if cancelled else "ok")})

    async def _acquired(self, version: str) -> Loaded:
        """The version's Loaded with the caller counted as a user: the operator's pinned one,
        else through Serve's LRU (which loads it on a miss)."""
        while True:
            pinned = self._pinned.get(version)
            loaded = pinned if pinned is not None else (await self.get_model(version)).loaded
            if loaded.acquire():
                return loaded
            # it left the engine between the lookup and now (a race with an eviction): ask again

    @staticmethod
    def _logprobs(pending: list[list], choices) -> dict:
        """{"logprobs": {choice: entries}} for these choices' pending entries (taken), or {}."""
        sent = {i: pending[i] for i in choices if pending[i]}
        for i in sent:
            pending[i] = []
        return {"logprobs": sent} if sent else {}

    @staticmethod
    def _item(i: int, out: Output, texts: list, reasons: list, counts: list) -> list | None:
        """A choice's news as a delta ([index, text, finish_reason, tokens]), or None if nothing new."""
        texts[i] += out.text
        counts[i] = out.num_tokens
        if out.finished:
            reasons[i] = out.finish_reason
            return [i, out.text, out.finish_reason, out.num_tokens]
        return [i, out.text, None, 0] if out.text else None


def count_tokens(counter, tokens: int, version: str) -> None:
    """Add a request's generated tokens to the counter. A request can end with none (the first
    sampled token was EOS, or its client left first), and Ray's Counter refuses inc(0) with a
    ValueError: raised in the stream's `finally`, that turned a finished request into a 500
    (22 of 5,578 requests in the soak benchmark, benchmarks/soak_serve.py)."""
    if tokens > 0:
        counter.inc(tokens, tags={"model": version})


def generator_deployment(max_models: int):
    """The Generator deployment class with an LRU of `max_models` versions per replica."""

    class Generator(GeneratorBase):
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, version: str) -> Held:
            return Held(await self._holding(version))

    return serve.deployment(name="Generator")(Generator)
