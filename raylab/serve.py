"""The Ray Serve application behind `raylab serve`: an OpenAI-compatible API over registry
versions, with dynamic batching and LoRA adapters multiplexed onto one base model.

    raylab serve configs/quickstart.yaml          # deploys it (see raylab/deploy.py)
    serve deploy runs/quickstart/serve/serve.yaml # the same app, from the emitted config

Two deployments, built by `build(args)` (the config's `import_path: raylab.serve:build`):

- `Ingress` (FastAPI): auth, size limits, request validation, routing the `model` field to a
  registry version, OpenAI responses and server-sent events. Its `user_config` holds the
  routing table, so `raylab deploy` switches versions with `reconfigure`, no restart.
- `Generator` (autoscaled): one base model per replica; each version is loaded on demand by
  `@serve.multiplexed` (LRU-bounded), verified against its registry checksums; an adapter
  goes into the shared base, a full model loads on its own. `@serve.batch` gathers requests
  arriving together (Serve splits batches by model id); they join that model's running
  decode loop (engine.Batch), which takes newcomers between steps (continuous batching), so
  the adapters of one base share a batch too.

`args` (changing them restarts replicas) and the `user_config`s are written by deploy.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylab import openai_api as oa
from raylab.engine import Batch, Sampling, Sequence, eos_ids
from raylab.errors import UserError

log = logging.getLogger("ray.serve")
api = FastAPI(title="raylab", docs_url=None, redoc_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request, exc: StarletteHTTPException):  # unknown paths and methods, OpenAI-shaped
    return JSONResponse(oa.ApiError(exc.status_code, str(exc.detail)).body(), exc.status_code)


# ---------------------------------------------------------------- the model side


class Loaded:
    """One version in a replica. Serve's LRU calls `__del__` on eviction; requests still
    decoding with it hold it, so its adapter leaves the base only when the last one ends."""

    def __init__(self, version: str, model, tok, adapter: str | None, unload):
        self.version, self.model, self.tok, self.adapter = version, model, tok, adapter
        self.stop_ids = eos_ids(model, tok)
        self._unload, self._users, self._evicted, self._gone = unload, 0, False, False
        from raylab.model import max_positions

        self.context = max_positions(getattr(model, "config", None)) or 1_000_000

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
    from raylab.generate import prompt_ids

    out = []
    for p in job["prompts"]:
        try:
            if job["chat"]:
                msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in p]
                out.append(prompt_ids(loaded.tok, {"messages": msgs}, "messages"))
            else:
                out.append(prompt_ids(loaded.tok, {"text": p}, "prompt"))
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
        from raylab import generate, registry

        if self.store is None:
            self.store = registry.open_store(tracking_uri=self.args["tracking_uri"])
        local = registry.fetch(self.store, version)  # refuses a changed artifact
        if self.base is not None and generate.is_adapter(local) and generate.base_of(local) == self.args["base"]:
            from peft import PeftModel

            name = f"v{next(self._names)}_{hashlib.sha1(version.encode()).hexdigest()[:8]}"
            with self.lock:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.base, local, adapter_name=name).eval()
                else:
                    self.peft.load_adapter(local, adapter_name=name)
            return Loaded(version, self.peft, generate.tokenizer(local), name, self._unload)
        model, tok = generate.load(local, dtype=self.args["dtype"])  # a full model, or another base
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


# ---------------------------------------------------------------- the HTTP side


class IngressImpl:
    """The Ingress deployment's code (kept importable under its own name: Serve's
    decorators subclass it, and the subclass is shipped by value)."""

    def __init__(self, generator, args: dict):
        self.generator, self.args, self.limits = generator, args, args["limits"]
        self.keys = api_keys(args)
        self.routes: dict[str, str] = {}
        self.listed: list[str] = []

    def reconfigure(self, user_config: dict) -> None:
        """The routing table: request `model` names -> registry versions (NAME/VERSION)."""
        self.routes = dict(user_config["routes"])
        self.listed = list(user_config["listed"])
        self.default = user_config["default"]

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.default}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except oa.ApiError as e:
            return JSONResponse(e.body(), e.status)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "raylab",
                                            "root": self.routes[m]} for m in self.listed]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._handle(request, oa.ChatRequest, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, oa.CompletionRequest, chat=False)

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or given.removeprefix("Bearer ").strip() not in self.keys:
            raise oa.ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>", code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        limit = self.limits["max_request_bytes"]
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > limit:
            raise oa.ApiError(400, f"request body of {declared} bytes exceeds {limit} (serve.max_request_bytes)")
        raw = await request.body()
        if len(raw) > limit:
            raise oa.ApiError(400, f"request body of {len(raw)} bytes exceeds {limit} (serve.max_request_bytes)")
        return raw

    def _job(self, req, chat: bool) -> dict:
        limit = self.limits["max_tokens"]
        wanted = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if wanted is not None and wanted > limit:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise oa.ApiError(400, f"{name}={wanted} exceeds the server's limit of {limit} (serve.max_tokens)", name, "invalid_value")
        prompts = ([[{"role": m.role, "content": m.text()} for m in req.messages]] if chat
                   else ([req.prompt] if isinstance(req.prompt, str) else list(req.prompt)))
        if len(prompts) * req.n > self.limits["max_batch_size"] * 4:
            raise oa.ApiError(400, f"{len(prompts)} prompts x n={req.n} is more choices than this server takes at once", "n")
        return {"chat": chat, "prompts": prompts, "n": req.n, "max_tokens": wanted, "stream": req.stream,
                "sampling": {"temperature": req.temperature, "top_p": req.top_p, "stop": req.stop or [], "seed": req.seed,
                             "ignore_eos": req.ignore_eos}}

    async def _handle(self, request: Request, kind, chat: bool):
        started, rid = time.monotonic(), oa.new_id("chatcmpl" if chat else "cmpl")
        try:
            self._authorize(request)
            req = oa.parse(kind, await self._body(request))
            version = self.routes.get(req.model)
            if version is None:
                raise oa.ApiError(404, f"The model '{req.model}' does not exist; GET /v1/models lists the servable ones",
                                  "model", "model_not_found")
            job = self._job(req, chat)
            stream = self.generator.options(stream=True, multiplexed_model_id=version).stream.remote(job)
            first = await stream.__anext__()
            if "error" in first:
                e = first["error"]
                raise oa.ApiError(e["status"], e["message"], e.get("param"), e.get("code"))
        except oa.ApiError as e:
            log.info(json.dumps({"request": rid, "status": e.status, "error": e.message[:200]}))
            return JSONResponse(e.body(), e.status)
        except Exception as e:  # a bug or a lost replica: OpenAI-shaped 500, logged with its traceback
            log.exception(f"request {rid} failed")
            return JSONResponse(oa.ApiError(500, f"internal error ({type(e).__name__}); see the server log", code="internal").body(), 500)
        record = {"request": rid, "model": req.model, "version": version, "prompt_tokens": first["prompt_tokens"]}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._events(stream, rid, req.model, chat, len(job["prompts"]) * req.n,
                                                  include_usage, record, started), media_type="text/event-stream")
        texts, finish, tokens = {}, {}, 0
        async for item in stream:
            for i, text, reason, count in item["deltas"]:
                texts[i] = texts.get(i, "") + text
                finish[i] = reason or finish.get(i)
                tokens += count
        choices = [{"index": i, "text": texts.get(i, ""), "finish_reason": finish.get(i)} for i in range(len(job["prompts"]) * req.n)]
        use = oa.usage(first["prompt_tokens"], tokens)
        self._log(record, use, started)
        return oa.completion(rid, req.model, choices, use, chat)

    async def _events(self, stream, rid, model, chat, n_choices, include_usage, record, started):
        for i in range(n_choices if chat else 0):  # the assistant role first, as OpenAI does
            yield oa.sse(oa.chunk(rid, model, i, None, None, chat, role=True))
        tokens = 0
        async for item in stream:
            for i, text, reason, count in item["deltas"]:
                tokens += count
                yield oa.sse(oa.chunk(rid, model, i, text, reason, chat))
        use = oa.usage(record["prompt_tokens"], tokens)
        if include_usage:
            yield oa.sse(oa.usage_chunk(rid, model, use, chat))
        yield oa.sse("[DONE]")
        self._log(record, use, started)

    def _log(self, record: dict, use: dict, started: float) -> None:
        log.info(json.dumps(record | {"completion_tokens": use["completion_tokens"],
                                      "latency_s": round(time.monotonic() - started, 4)}))


def api_keys(args: dict) -> set[str]:
    keys: set[str] = set()
    if args.get("api_keys_env"):
        keys |= {k.strip() for k in os.environ.get(args["api_keys_env"], "").split(",") if k.strip()}
    if args.get("api_keys_file"):
        with open(args["api_keys_file"]) as f:
            keys |= {line.strip() for line in f if line.strip() and not line.startswith("#")}
    if (args.get("api_keys_env") or args.get("api_keys_file")) and not keys:
        raise RuntimeError("API keys are configured (serve.api_keys_env / serve.api_keys_file) but none were found")
    return keys


Ingress = serve.deployment(name="Ingress")(serve.ingress(api)(IngressImpl))


def build(args: dict):
    """The application for `serve deploy` / the REST API: import path `raylab.serve:build`."""
    generator = generator_deployment(int(args["limits"]["max_adapters_per_replica"])).bind(args)
    return Ingress.bind(generator, args)
