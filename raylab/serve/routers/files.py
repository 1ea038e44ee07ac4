"""The fine-tuning service's files (OpenAI's /v1/files): upload a chat JSONL with
`purpose=fine-tune`, list, read, delete, download. Org-scoped; kept through core.storage.

    curl -H "Authorization: Bearer $KEY" -F purpose=fine-tune -F file=@train.jsonl http://HOST/v1/files
    client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")   # the openai client

The routes answer 404 when the service is not mounted (api.enabled false in `raylab serve`).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from raylab.serve import openai_api as oa
from raylab.serve.ftrequests import file_object, too_large

router = APIRouter()
FORM_SLACK = 64 * 1024  # multipart headers and the purpose field around the file itself


def service(request: Request):
    """The FineTuning service (serve/finetune.py) of this app (the ingress's `ftapi`), or a 404
    when it has none."""
    found = getattr(request.app.state.ingress, "ftapi", None)
    if found is None:
        raise oa.ApiError(404, "the fine-tuning service is not enabled on this endpoint (api.enabled)",
                          code="not_found")
    return found


def caller(request: Request, svc):
    return svc.caller(request.headers.get("authorization", ""))


@router.post("/v1/files")
async def create_file(request: Request):
    svc = service(request)
    principal = await asyncio.to_thread(caller, request, svc)
    limit = svc.settings.max_file_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_SLACK:  # refused before a byte is parsed
        raise too_large(int(declared), limit)
    form = await request.form(max_files=1, max_fields=4)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise oa.ApiError(400, "missing file: send it as the multipart field `file`", "file")
        if not isinstance(purpose, str) or not purpose:
            raise oa.ApiError(400, "missing purpose: send purpose=fine-tune", "purpose")
        chunks, size = [], 0
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            chunks.append(chunk)
        row = await asyncio.to_thread(svc.create_file, principal, upload.filename or "", b"".join(chunks), purpose)
    finally:
        await form.close()  # Starlette's spooled temporary files, removed now
    return file_object(row)


@router.get("/v1/files")
def list_files(request: Request, purpose: str | None = None):
    svc = service(request)
    rows = svc.files(caller(request, svc), purpose)
    return {"object": "list", "data": [file_object(r) for r in rows], "has_more": False}


@router.get("/v1/files/{file_id}")
def get_file(request: Request, file_id: str):
    svc = service(request)
    return file_object(svc.file(caller(request, svc), file_id))


@router.delete("/v1/files/{file_id}")
def delete_file(request: Request, file_id: str):
    svc = service(request)
    return svc.delete_file(caller(request, svc), file_id)


@router.get("/v1/files/{file_id}/content")
def file_content(request: Request, file_id: str):
    svc = service(request)
    return Response(svc.content(caller(request, svc), file_id), media_type="application/octet-stream")
