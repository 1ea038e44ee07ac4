"""The ingress's HTTP routes, one FastAPI `APIRouter` per concern, mounted in the one ingress
app by `app.create_app(routers, ingress)`:

- health: `/healthz`, `/v1/models` (health and metadata);
- inference: `/v1/completions`, `/v1/chat/completions` (OpenAI-compatible generation, with
  retrieval when `serve.rag` attaches an index);
- embeddings: `/v1/embeddings` (the index's embedding model);
- explain: `/v1/explain`, `/v1/explain/{id}/html` (token attributions, the Explainer deployment).

A route handler reaches the running ingress (its routing table, API keys, limits and the
Generator's handle) through the `ingress` dependency. A new concern (embeddings, retrieval,
the fine-tuning service) is a new router added to `app.ROUTERS`.
"""

from __future__ import annotations

from fastapi import Request


def ingress(request: Request):
    """The Ingress deployment object serving this request (set by `app.create_app`)."""
    return request.app.state.ingress
