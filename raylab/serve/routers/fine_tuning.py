"""The fine-tuning service's jobs (OpenAI's /v1/fine_tuning/jobs): create, list (newest first,
`after`/`limit`), get, cancel, and the job's events. See serve/finetune.py for the lifecycle.

    curl -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
         -d '{"model": "preset:tiny-llama", "training_file": "file-..."}' http://HOST/v1/fine_tuning/jobs
    client.fine_tuning.jobs.create(model="preset:tiny-llama", training_file=f.id)   # the openai client

    client.fine_tuning.jobs.checkpoints.list(job.id)                     # ftckpt_ objects, newest first

    client.fine_tuning.jobs.pause(job.id); client.fine_tuning.jobs.resume(job.id)

Pause stops the Ray job (state `paused`); resume submits the job's kept config again on the
same run directory, so training continues from its latest checkpoint. A checkpoint's
`fine_tuned_model_checkpoint` names it; only the job's final model is served.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from raylab.serve.ftrequests import JobRequest, event_object, job_object, parse
from raylab.serve.routers.files import caller, service

router = APIRouter()


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request):
    import asyncio

    svc = service(request)
    raw = await request.body()
    principal = await asyncio.to_thread(caller, request, svc)
    body = parse(raw, JobRequest)
    return job_object(await asyncio.to_thread(svc.create_job, principal, body))


@router.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
    svc = service(request)
    rows, more = svc.jobs(caller(request, svc), after, limit)
    return {"object": "list", "data": [job_object(r) for r in rows], "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(request: Request, job_id: str):
    svc = service(request)
    return job_object(svc.job(caller(request, svc), job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: str):
    svc = service(request)
    return job_object(svc.cancel(caller(request, svc), job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
def pause_job(request: Request, job_id: str):
    svc = service(request)
    return job_object(svc.pause(caller(request, svc), job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
def resume_job(request: Request, job_id: str):
    svc = service(request)
    return job_object(svc.resume(caller(request, svc), job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(request: Request, job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
    svc = service(request)
    rows, more = svc.events(caller(request, svc), job_id, after, limit)
    return {"object": "list", "data": [event_object(r) for r in rows], "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(request: Request, job_id: str, after: str | None = None,
                     limit: int = Query(10, ge=1, le=100)):
    svc = service(request)
    rows, more = svc.checkpoints(caller(request, svc), job_id, after, limit)
    return {"object": "list", "data": rows, "has_more": more,
            "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None}
