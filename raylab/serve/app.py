"""The Ray Serve application behind `raylab serve`: an OpenAI-compatible API over registry
versions, with dynamic batching and LoRA adapters multiplexed onto one base model.

    raylab serve configs/quickstart.yaml          # deploys it (see deploy.py)
    serve deploy runs/quickstart/serve/serve.yaml # the same app, from the emitted config

Two deployments, built by `build(args)` (the config's `import_path: raylab.serve:build`):

- `Ingress` (FastAPI): auth, size limits, request validation, routing the `model` field to a
  registry version, OpenAI responses and server-sent events. Its `user_config` holds the
  routing table, so `raylab deploy` switches versions with `reconfigure`, no restart.
- `Generator` (autoscaled, generator.py): one base model per replica, registry versions
  multiplexed onto it, continuous batching (engine.py).

`args` (changing them restarts replicas) and the `user_config`s are written by deploy.py.
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylab.serve import openai_api as oa
from raylab.serve.auth import api_keys
from raylab.serve.generator import generator_deployment

log = logging.getLogger("ray.serve")
api = FastAPI(title="raylab", docs_url=None, redoc_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request, exc: StarletteHTTPException):  # unknown paths and methods, OpenAI-shaped
    return JSONResponse(oa.ApiError(exc.status_code, str(exc.detail)).body(), exc.status_code)


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


Ingress = serve.deployment(name="Ingress")(serve.ingress(api)(IngressImpl))


def build(args: dict):
    """The application for `serve deploy` / the REST API: import path `raylab.serve:build`."""
    generator = generator_deployment(int(args["limits"]["max_adapters_per_replica"])).bind(args)
    return Ingress.bind(generator, args)
