"""The registry's production moves and deploys through the service (serve/registry_api.py),
for callers holding a raylab key or OIDC token; `raylab models promote|rollback` and
`raylab deploy` use them when $RAYLAB_API_URL is set.

    curl -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
         -d '{"version": 3, "reason": "reviewed"}' http://HOST/v1/registry/models/acme-assistant/promote
    curl ... -d '{"reason": "p99 regressed"}' http://HOST/v1/registry/models/acme-assistant/rollback
    curl ... -d '{"ref": "acme-assistant@production"}' http://HOST/v1/registry/deploy
    curl ... -d '{"ref": "acme-assistant/3"}' http://HOST/v1/registry/load      # or /unload
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from raylab.serve.ftrequests import parse
from raylab.serve.routers.files import caller, service

router = APIRouter()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromoteRequest(_Strict):
    version: int | str = Field(description="a version number, or `latest`")
    reason: str | None = Field(None, max_length=2000)
    force: bool = Field(False, description="promote although the gates did not pass (needs a reason)")


class RollbackRequest(_Strict):
    reason: str | None = Field(None, max_length=2000)


class DeployRequest(_Strict):
    ref: str = Field(min_length=1, max_length=500, description="NAME@ALIAS or NAME/VERSION")


async def _call(request: Request, kind, act):
    svc = service(request)
    principal = await asyncio.to_thread(caller, request, svc)  # a 401 before any 400
    body = parse(await request.body(), kind)
    return await asyncio.to_thread(act, svc.models, principal, body)


@router.post("/v1/registry/models/{name}/promote")
async def promote(request: Request, name: str):
    return await _call(request, PromoteRequest,
                       lambda ops, who, b: ops.promote(who, name, str(b.version), b.force, b.reason))


@router.post("/v1/registry/models/{name}/rollback")
async def rollback(request: Request, name: str):
    return await _call(request, RollbackRequest, lambda ops, who, b: ops.rollback(who, name, b.reason))


@router.post("/v1/registry/deploy")
async def deploy(request: Request):
    return await _call(request, DeployRequest, lambda ops, who, b: ops.deploy(who, b.ref))


@router.post("/v1/registry/load")
async def load(request: Request):
    return await _call(request, DeployRequest, lambda ops, who, b: ops.load(who, b.ref, True))


@router.post("/v1/registry/unload")
async def unload(request: Request):
    return await _call(request, DeployRequest, lambda ops, who, b: ops.load(who, b.ref, False))
