"""OpenAI-compatible `POST /v1/embeddings`: the embedding model of the index attached by
`serve.rag`, served under the name the index's manifest records (MiniLM's is
`sentence-transformers/all-MiniLM-L6-v2`; listed by /v1/models).

    curl $URL/v1/embeddings -H "Authorization: Bearer $KEY" \\
         -d '{"model": "sentence-transformers/all-MiniLM-L6-v2", "input": ["a text", "another"]}'

    openai.OpenAI(base_url=URL + "/v1", api_key=KEY).embeddings.create(model=..., input=[...])

Vectors are L2-normalised (as the index's), `encoding_format: base64` is little-endian
float32 as OpenAI's. 400 for an empty input, more inputs than `serve.rag.max_inputs`, an input
over `serve.rag.max_input_tokens`; 404 for another model or an endpoint without `serve.rag`.
"""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
from fastapi import APIRouter, Depends, Request

from raylab.serve import openai_api as oa
from raylab.serve import retrieval
from raylab.serve.routers import answer_error, error_response, ingress, read_body

log = logging.getLogger("ray.serve")
router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(request: Request, server=Depends(ingress)):
    rid = oa.new_id("emb")
    try:
        await server.authorized(request)
        req = oa.parse(oa.EmbeddingRequest, await read_body(server.limits, request))
        args = server.rag
        if args is None or req.model != args["model"]:
            served = f"; this endpoint serves embeddings as '{args['model']}'" if args else \
                " (no embedding model is served here: serve.rag is not set)"
            raise oa.ApiError(404, f"The model '{req.model}' does not exist{served}", "model", "model_not_found")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        _check(args, req, texts)
        done = await retrieval.call(server.embedder, "embed", texts)
        if "error" in done:
            raise answer_error(done["error"])
    except Exception as e:  # an ApiError is its 4xx, anything else a logged 500 (error_response)
        return error_response(rid, e)
    vectors = np.asarray(done["vectors"], dtype="<f4")
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    log.info(json.dumps({"request": rid, "model": req.model, "inputs": len(texts), "tokens": done["tokens"]}))
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": done["tokens"], "total_tokens": done["tokens"]}}


def _check(args: dict, req, texts: list[str]) -> None:
    if not texts:
        raise oa.ApiError(400, "'input' is an empty list; give a string or a list of strings", "input", "invalid_value")
    if len(texts) > args["max_inputs"]:
        raise oa.ApiError(400, f"{len(texts)} inputs exceed the server's limit of {args['max_inputs']} per request "
                               "(serve.rag.max_inputs)", "input", "invalid_value")
    for i, text in enumerate(texts):
        if not text.strip():
            where = "input" if isinstance(req.input, str) else f"input.{i}"
            raise oa.ApiError(400, f"'{where}' is empty; every input must hold text", where, "invalid_value")
    if req.dimensions is not None and req.dimensions != args["dimensions"]:
        raise oa.ApiError(400, f"dimensions={req.dimensions}: {args['model']} makes {args['dimensions']}-dimensional "
                               "embeddings and cannot shorten them", "dimensions", "invalid_value")


def _encoded(vector: np.ndarray, encoding: str):
    if encoding == "base64":  # OpenAI's: the float32 bytes, little-endian, base64
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
