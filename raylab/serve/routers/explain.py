"""Explanations: `POST /v1/explain` (which prompt tokens each token of an answer came from,
computed by the Explainer deployment on the version the request's `model` routes to) and
`GET /v1/explain/{id}/html` (a recent explanation coloured by attribution). Same API keys as
the completions; errors in OpenAI's shape. Served when `serve.explain.enabled`; otherwise
both answer 404 naming that key.

    curl $URL/v1/explain -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
         -d '{"model": "acme-assistant", "messages": [{"role": "user", "content": "Reset my VPN token?"}],
              "method": "integrated_gradients", "n_steps": 64}'
    # per sentence (or "spans": [[0, 23], [24, 36]], character offsets into the prompt or the
    # last message) with a perturbation method; SHAP values with "method": "shap", "evals": 300
    curl $URL/v1/explain ... -d '{"model": "acme-assistant", "prompt": "Reset it in the portal. Then log in.",
              "method": "feature_ablation", "granularity": "sentence"}'
    curl $URL/v1/explain/explain-.../html -H "Authorization: Bearer $KEY" > why.html

With `serve.rag` a chat is retrieved for first, as the chat route does (`retrieve`), and
`"granularity": "document"` makes each retrieved chunk a span.

The request is checked here before it goes to the Explainer (which knows the tokenizer, so
checks the token limits); the answer is kept in the ingress's memory (the last
`serve.explain.keep_results`, for `keep_seconds`) for its HTML view.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from raylab import explain
from raylab.config import EXPLAIN_METHODS, SPAN_METHODS
from raylab.serve import openai_api as oa
from raylab.serve import retrieval
from raylab.serve.routers import answer_error, error_response, ingress, read_body

log = logging.getLogger("ray.serve")
router = APIRouter()


class ExplainRequest(BaseModel):
    """The body of `POST /v1/explain`; unknown keys are a 400 naming them, as elsewhere."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    prompt: str | None = None  # plain text, no chat template (as /v1/completions)
    messages: list[oa.ChatMessage] | None = Field(None, min_length=1)  # a chat (as /v1/chat/completions)
    target: str | None = None  # default: the model's own greedy answer
    method: Literal[EXPLAIN_METHODS] | None = None  # type: ignore[valid-type]
    n_steps: int | None = Field(None, ge=1)
    samples: int | None = Field(None, ge=1)
    evals: int | None = Field(None, ge=1)  # shap's model evaluations
    baseline: Literal["pad", "unk", "eos"] | None = None
    # a perturbation method's features: [start, end] character offsets into the prompt (or
    # the last message), or each sentence; default: each token
    spans: list[tuple[int, int]] | None = Field(None, min_length=1)
    granularity: Literal["token", "sentence", "document"] | None = None  # document: each retrieved chunk
    raylab: oa.ChatExtension | None = None  # retrieval, as for chat completions (serve.rag)


class Recent:
    """The last `keep` explanations, each for `seconds`: bounded, in the ingress's memory (a
    restarted ingress replica starts empty; its explanations are then a 404)."""

    def __init__(self, keep: int, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.keep, self.seconds, self.clock = keep, seconds, clock
        self._items: OrderedDict[str, tuple[float, dict]] = OrderedDict()

    def put(self, key: str, value: dict) -> None:
        now = self.clock()
        while self._items and now - next(iter(self._items.values()))[0] > self.seconds:  # the oldest expired first
            self._items.popitem(last=False)
        self._items[key] = (now, value)
        while len(self._items) > self.keep:
            self._items.popitem(last=False)

    def get(self, key: str) -> dict | None:
        item = self._items.get(key)
        if item is None or self.clock() - item[0] > self.seconds:
            return None
        return item[1]


def job(settings: dict, req: ExplainRequest) -> dict:
    """What the Explainer runs: the request checked, the config's defaults filled in."""
    if (req.prompt is None) == (req.messages is None):
        raise oa.ApiError(400, "give one of 'prompt' (plain text) or 'messages' (a chat), not both or neither", "prompt",
                          "invalid_value")
    if req.prompt is not None and not req.prompt.strip():
        raise oa.ApiError(400, "'prompt' is empty; give the text whose answer to explain", "prompt", "invalid_value")
    if req.messages is not None and not any(m.text().strip() for m in req.messages):
        raise oa.ApiError(400, "'messages' hold no text; give the conversation whose answer to explain", "messages",
                          "invalid_value")
    if req.target is not None and not req.target.strip():
        raise oa.ApiError(400, "'target' is empty; leave it out to explain the model's own greedy answer", "target",
                          "invalid_value")
    defaults, limits = settings["defaults"], settings["limits"]
    method = req.method or defaults["method"]
    for name, value, used_by in (("n_steps", req.n_steps, "integrated_gradients"), ("samples", req.samples, "shapley_sampling"),
                                 ("evals", req.evals, "shap")):
        if value is None:
            continue
        if method != used_by:
            raise oa.ApiError(400, f"'{name}' applies to method {used_by} only (method is {method})", name, "invalid_value")
        if value > limits[f"max_{name}"]:
            raise oa.ApiError(400, f"{name}={value} exceeds the server's limit of {limits[f'max_{name}']} "
                                   f"(serve.explain.max_{name})", name, "invalid_value")
    granularity = req.granularity or "token"
    for name, asked in (("spans", req.spans is not None), ("granularity", granularity != "token")):
        if asked and method not in SPAN_METHODS:
            raise oa.ApiError(400, f"'{name}' applies to methods {' and '.join(SPAN_METHODS)} only (method is {method}, "
                                   "which attributes to tokens)", name, "invalid_value")
    if req.spans is not None and granularity != "token":
        raise oa.ApiError(400, f"give 'spans' or 'granularity': {granularity}, not both", "spans", "invalid_value")
    messages = None if req.messages is None else [{"role": m.role, "content": m.text()} for m in req.messages]
    return {"prompt": req.prompt, "messages": messages, "target": req.target, "method": method,
            "n_steps": req.n_steps or defaults["n_steps"], "samples": req.samples or defaults["samples"],
            "evals": req.evals or defaults["evals"], "baseline": req.baseline or defaults["baseline"],
            "spans": None if req.spans is None else [list(s) for s in req.spans], "granularity": granularity}


def document_spans(content: str, sources: list[dict]) -> list[list[int]]:
    """[start, end] of each retrieved chunk's text in the rewritten message (raylab.rag's
    retrieval prompt holds them in order, each after its `[n] (origin)` heading)."""
    spans, pos = [], 0
    for source in sources:
        text = source["text"].strip()
        start = content.find(text, pos)
        if start < 0:
            raise RuntimeError(f"retrieved chunk {source['chunk_id']} is not in the retrieval prompt")
        spans.append([start, start + len(text)])
        pos = start + len(text)
    return spans


async def retrieve(server, job: dict, ext, caller) -> list[dict] | None:
    """A chat is explained as it is answered: with serve.rag (or the request's `raylab`
    extension) its last user message is rewritten with the retrieved chunks first
    (retrieval.augment). Returns the chunks (None: no retrieval); `granularity: document`
    makes each chunk's text a span."""
    if job["messages"] is None:
        if ext is not None or job["granularity"] == "document":
            param = "raylab" if ext is not None else "granularity"
            raise oa.ApiError(400, "retrieval explains chats: give 'messages', not 'prompt'", param, "invalid_value")
        return None
    org = (caller.org or None) if caller is not None else None  # as the chat route: no org, chunks without one
    messages, sources = await retrieval.augment(server, job["messages"], ext, org=org)
    job["messages"] = messages
    if job["granularity"] == "document":
        if not sources:
            raise oa.ApiError(400, "granularity document needs retrieved documents: this request retrieved none "
                                   "(serve.rag not set, or raylab.retrieval: false)", "granularity", "invalid_value")
        job["spans"] = document_spans(messages[-1]["content"], sources)
    return sources


def _enabled(server) -> None:
    if server.explainer is None:
        raise oa.ApiError(404, "explanations are not served by this endpoint; deploy it with serve.explain.enabled: "
                               "true", code="explain_not_enabled")


@router.post("/v1/explain")
async def explain_answer(request: Request, server=Depends(ingress)):
    started, rid = time.monotonic(), oa.new_id("explain")
    try:
        principal = await server.authorized(request)
        _enabled(server)
        req = oa.parse(ExplainRequest, await read_body(server.limits, request))
        version = await server.route(req.model, principal)
        if version is None:
            raise oa.ApiError(404, f"The model '{req.model}' does not exist; GET /v1/models lists the servable ones",
                              "model", "model_not_found")
        checked = job(server.args["explain"], req)
        sources = await retrieve(server, checked, req.raylab, principal)
        answer = await server.explain(version, checked)
        if "error" in answer:
            raise answer_error(answer["error"])
    except Exception as e:  # an ApiError is its 4xx, anything else a logged 500 (error_response)
        return error_response(rid, e)
    result = answer["result"]
    body = {"id": rid, "object": "explanation", "created": int(time.time()), "model": req.model, "version": version,
            **result, "html": f"/v1/explain/{rid}/html"}
    if sources is not None:
        body["sources"] = sources
    server.explained.put(rid, body)
    log.info(json.dumps({"request": rid, "model": req.model, "version": version, "method": result["method"],
                         "input_tokens": len(result["input_tokens"]), "output_tokens": len(result["output_tokens"]),
                         "latency_s": round(time.monotonic() - started, 4)}))
    return body


@router.get("/v1/explain/{explanation_id}/html")
async def explanation_html(explanation_id: str, request: Request, server=Depends(ingress)):
    try:
        await server.authorized(request)
        _enabled(server)
        found = server.explained.get(explanation_id)
        if found is None:
            raise oa.ApiError(404, f"no recent explanation '{explanation_id}' (this endpoint keeps the last "
                                   f"{server.explained.keep} for {server.explained.seconds:.0f} s); POST /v1/explain "
                                   "again", "id", "explanation_not_found")
    except oa.ApiError as e:
        return JSONResponse(e.body(), e.status)
    return HTMLResponse(explain.html_page(found))
