"""User feedback: `POST /v1/feedback` rates a response the endpoint gave, by its `id`.

    curl -H "Authorization: Bearer $KEY" -d '{"id": "chatcmpl-...", "score": 1}' $URL/v1/feedback

`score` is in [0, 1] (0 bad, 1 good; thumbs down/up are 0 and 1). The ingress remembers which
version answered each of its recent responses (the last app.ANSWERED), so the rating counts
for that version; while a canary rollout runs, its controller compares the candidate's mean
rating with `serve.canary.min_feedback`. An id this ingress did not answer (or has forgotten)
is a 404: a rating nobody can attribute is not counted anywhere.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from raylab.serve import openai_api as oa
from raylab.serve.routers import ingress, read_body

router = APIRouter()


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    score: float = Field(ge=0.0, le=1.0)


@router.post("/v1/feedback")
async def feedback(request: Request, server=Depends(ingress)):
    try:
        await server.authorized(request)
        req = oa.parse(FeedbackRequest, await read_body(server.limits, request))
        version = server.answered.get(req.id)
        if version is None:
            raise oa.ApiError(404, f"no recent response has id {req.id!r} (send the `id` of a response this endpoint "
                                   "gave)", "id", "response_not_found")
    except oa.ApiError as e:
        return JSONResponse(e.body(), e.status)
    counted = server.canary is not None and version in (server.default, server.canary["candidate"])
    if counted:
        server.report("rate", version, req.score)
    return {"id": req.id, "version": version, "score": req.score, "counted_by_canary": counted}
