"""The ingress's HTTP routes, one FastAPI `APIRouter` per concern, mounted in the one ingress
app by `app.create_app(routers, ingress)`:

- health: `/healthz`, `/v1/models` (health and metadata);
- inference: `/v1/completions`, `/v1/chat/completions` (OpenAI-compatible generation, with
  retrieval when `serve.rag` attaches an index);
- embeddings: `/v1/embeddings` (the index's embedding model);
- explain: `/v1/explain`, `/v1/explain/{id}/html` (token attributions, the Explainer deployment);
- feedback: `/v1/feedback` (a user's rating of a response, for the canary rollout's metrics);
- files, fine_tuning: `/v1/files...`, `/v1/fine_tuning/jobs...` (the fine-tuning service,
  serve/finetune.py; 404 unless `api.enabled`, or alone in `raylab api --standalone`);
- release: `/v1/registry/models/{name}/promote|rollback`, `/v1/registry/deploy` (production
  moves and deploys under the caller's role, serve/registry_api.py; mounted with the service).

A route handler reaches the running ingress (its routing table, API keys, limits and the
Generator's handle) through the `ingress` dependency. A new concern (embeddings, retrieval,
the fine-tuning service) is a new router added to `app.ROUTERS`.
"""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from raylab.serve import openai_api as oa

log = logging.getLogger("ray.serve")


def ingress(request: Request):
    """The Ingress deployment object serving this request (set by `app.create_app`)."""
    return request.app.state.ingress


async def read_body(limits: dict, request: Request) -> bytes:
    """The request body, refused with a 400 above serve.max_request_bytes (declared or sent)."""
    limit = limits["max_request_bytes"]
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > limit:
        raise oa.ApiError(400, f"request body of {declared} bytes exceeds {limit} (serve.max_request_bytes)")
    raw = await request.body()
    if len(raw) > limit:
        raise oa.ApiError(400, f"request body of {len(raw)} bytes exceeds {limit} (serve.max_request_bytes)")
    return raw


def internal_error(e: Exception) -> oa.ApiError:
    """A bug or a lost replica: OpenAI-shaped 500 (the traceback is in the server log)."""
    return oa.ApiError(500, f"internal error ({type(e).__name__}); see the server log", code="internal")


def answer_error(error: dict, suffix: str = "") -> oa.ApiError:
    """A deployment's `{"error": {...}}` answer as the OpenAI-shaped error it describes."""
    return oa.ApiError(error["status"], error["message"] + suffix, error.get("param"), error.get("code"))


def error_response(rid: str, e: Exception) -> JSONResponse:
    """A failed request's response: an ApiError as its 4xx (one log line), anything else a
    bug or a lost replica, an OpenAI-shaped 500 logged with its traceback."""
    if isinstance(e, oa.ApiError):
        log.info(json.dumps({"request": rid, "status": e.status, "error": e.message[:200]}))
        return JSONResponse(e.body(), e.status)
    log.exception(f"request {rid} failed")
    return JSONResponse(internal_error(e).body(), 500)
