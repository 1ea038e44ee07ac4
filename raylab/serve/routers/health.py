"""Health and metadata: `/healthz` (no key needed: the proxy's and `raylab deploy`'s check)
and `/v1/models` (the servable model names, looked up at request time, then the embedding
model of `serve.rag`'s index when one is attached)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from raylab.serve import openai_api as oa
from raylab.serve.routers import ingress

router = APIRouter()


@router.get("/healthz")
async def healthz(server=Depends(ingress)) -> dict:
    return {"status": "ok", "model": server.default,
            "canary": server.canary["candidate"] if server.canary else None}  # `raylab deploy` waits for both


@router.get("/v1/models")
async def list_models(request: Request, server=Depends(ingress)):
    try:
        await server.authorized(request)
    except oa.ApiError as e:
        return JSONResponse(e.body(), e.status)
    await server.refresh()  # versions registered since the deploy
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "raylab", "root": server.routes[m]}
            for m in server.listed]
    if server.rag:  # the index's embedding model, served at /v1/embeddings
        data.append({"id": server.rag["model"], "object": "model", "created": 0, "owned_by": "raylab",
                     "root": server.rag["index"]})
    return {"object": "list", "data": data}
