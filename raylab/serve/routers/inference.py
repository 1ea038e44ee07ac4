"""OpenAI-compatible generation: `/v1/completions` and `/v1/chat/completions` (API keys,
size limits, validation, routing the `model` field to a registry version, OpenAI responses
and server-sent events); the Generator deployment generates.

With `serve.rag`, a chat request first retrieves (retrieval.augment): its last user message is
rewritten in the retrieval prompt with the top_k chunks, and the chunks come back as
`raylab: {sources: [...]}` on the response, or on the first event of a stream (before any
token). A request's `raylab: {retrieval: false}` or `{top_k: N}` changes that for itself.
Retrieval sees only the chunks the caller's organisation may read (its API key's org, from
`server.authorize`): a caller of org A never gets org B's chunks."""

from __future__ import annotations

import json
import logging
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from raylab.serve import openai_api as oa
from raylab.serve import retrieval, streams, tools
from raylab.serve.routers import answer_error, error_response, ingress, internal_error, read_body
from raylab.serve.sample import prompt_text

log = logging.getLogger("ray.serve")
router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(request: Request, server=Depends(ingress)):
    return await _handle(server, request, oa.ChatRequest, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, server=Depends(ingress)):
    return await _handle(server, request, oa.CompletionRequest, chat=False)


def _job(limits: dict, req, chat: bool, parser: str | None = None) -> dict:
    limit = limits["max_tokens"]
    wanted = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if wanted is not None and wanted > limit:
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise oa.ApiError(400, f"{name}={wanted} exceeds the server's limit of {limit} (serve.max_tokens)", name, "invalid_value")
    prompts = ([[m.rendered() for m in req.messages]] if chat
               else ([req.prompt] if isinstance(req.prompt, str) else list(req.prompt)))
    if len(prompts) * req.n > limits["max_batch_size"] * 4:
        raise oa.ApiError(400, f"{len(prompts)} prompts x n={req.n} is more choices than this server takes at once", "n")
    call = tools.plan(req, parser) if chat else None
    forced = call is not None and "constraint" in call  # else free text (auto: the parser finds its calls)
    constraint = req.response_format.constraint() if chat and req.response_format else None
    return {"chat": chat, "prompts": prompts, "n": req.n, "max_tokens": wanted, "stream": req.stream,
            # the chat template's tools (where it takes them), and the forced call the answer is
            "tools": [t.model_dump(exclude_none=True) for t in req.tools] if chat and req.tools else None,
            "tool_call": call, "constraint_param": "tool_choice" if forced else "response_format",
            "sampling": {"temperature": req.temperature, "top_p": req.top_p, "stop": req.stop or [], "seed": req.seed,
                         "ignore_eos": req.ignore_eos, "presence_penalty": req.presence_penalty,
                         "frequency_penalty": req.frequency_penalty,
                         "constraint": call["constraint"] if forced else constraint,
                         "logprobs": req.logprobs_wanted()}}


async def _handle(server, request: Request, kind, chat: bool):
    started, rid = time.monotonic(), oa.new_id("chatcmpl" if chat else "cmpl")
    model, version = "", None  # what the metrics name a request that failed before routing
    try:
        caller = await server.authorized(request)
        req = oa.parse(kind, await read_body(server.limits, request))
        model = req.model
        # a canary's share of production traffic goes to the candidate (server.split)
        version = server.split(req.model, await server.route(req.model, caller), req.user, request)
        if version is None:
            raise oa.ApiError(404, f"The model '{req.model}' does not exist; GET /v1/models lists the servable ones",
                              "model", "model_not_found")
        job = _job(server.limits, req, chat, (server.args.get("vllm") or {}).get("tool_parser"))
        server.keep_prompt(prompt_text(job))  # as the client sent it: before retrieval rewrites it
        sources = None
        if chat:
            # a caller in no organisation (no keys, a static key: org "") sees only chunks without one
            org = (caller.org or None) if caller is not None else None
            messages, sources = await retrieval.augment(server, job["prompts"][0], req.raylab, org=org)
            job["prompts"] = [messages]
        stream = streams.Generation(server.generator, version, job, server.limits["resubmit_timeout_s"], rid)
        first = await stream.open()  # re-submitted while a lost replica is replaced (streams.py)
        if "error" in first:
            e = first["error"]
            retrieved = sources and e.get("code") == "context_length_exceeded"
            raise answer_error(e, f", with {len(sources)} retrieved chunks in it: ask fewer with raylab.top_k"
                               if retrieved else "")
    except Exception as e:  # an ApiError is its 4xx, anything else a logged 500 (error_response)
        response = error_response(rid, e)
        server.record(model, version, response.status_code, started)
        return response
    record = {"request": rid, "model": req.model, "version": version, "prompt_tokens": first["prompt_tokens"]}
    if sources is not None:
        record["retrieved"] = [s["chunk_id"] for s in sources]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_events(server, stream, rid, req.model, chat, len(job["prompts"]) * req.n,
                                         include_usage, record, started, sources, job["tool_call"]),
                                 media_type="text/event-stream")
    texts, finish, tokens, called = {}, {}, 0, {}
    logprobs = {} if job["sampling"]["logprobs"] is not None else None
    try:
        async for item in stream.items():  # one message at the end: re-submitted whole on a lost replica
            for i, text, reason, count in item["deltas"]:
                texts[i] = texts.get(i, "") + text
                finish[i] = reason or finish.get(i)
                tokens += count
            for i, entries in item.get("logprobs", {}).items():
                logprobs.setdefault(i, []).extend(entries)
            called |= item.get("tool_calls", {})  # tool_choice auto: the calls the parser found
    except oa.ApiError as e:
        log.info(json.dumps({"request": rid, "status": e.status, "error": e.message[:200]}))
        server.record(model, version, e.status, started, first["prompt_tokens"], tokens)
        return JSONResponse(e.body(), e.status)
    except Exception as e:
        log.exception(f"request {rid} failed")
        server.record(model, version, 500, started, first["prompt_tokens"], tokens)
        return JSONResponse(internal_error(e).body(), 500)
    finally:
        stream.cancel()  # a no-op once it ended; else (the client went away) its rows leave the batch
    server.record(model, version, 200, started, first["prompt_tokens"], tokens)
    server.answered_by(rid, version)
    choices = [{"index": i, "text": texts.get(i, ""), "finish_reason": finish.get(i),
                "logprobs": None if logprobs is None else logprobs.get(i, [])} for i in range(len(job["prompts"]) * req.n)]
    if job["tool_call"] is not None and "parser" not in job["tool_call"]:  # forced: the answers as tool_calls
        for c in choices:
            c["tool_calls"], c["finish_reason"] = tools.shape(job["tool_call"], c["text"], c["finish_reason"])
    for i, (calls, content) in called.items():  # auto: the calls and the text around them
        choices[i].update(tool_calls=calls, content=content, finish_reason="tool_calls")
    use = oa.usage(first["prompt_tokens"], tokens)
    _log(record, use, started)
    body = oa.completion(rid, req.model, choices, use, chat)
    return body | ({"raylab": {"sources": sources}} if sources is not None else {})


async def _events(server, stream, rid, model, chat, n_choices, include_usage, record, started, sources=None,
                  call=None):
    for i in range(n_choices if chat else 0):  # the assistant role first, as OpenAI does
        first = oa.chunk(rid, model, i, None, None, chat, role=True)
        if i == 0 and sources is not None:
            # the sources ride on the first (role) event, before any token: a client that
            # reads choices[0] of every event keeps working, one that knows looks for `raylab`
            first["raylab"] = {"sources": sources}
        yield oa.sse(first)
    # offsets: a completion choice's text_offset so far; called: the choices whose forced call
    # (a named function: plan() refuses to stream `required`) has sent its id and name
    tokens, offsets, called = 0, {}, set()
    try:
        async for item in stream.items():
            pending = dict(item.get("logprobs", {}))  # a choice's entries ride with its first delta of the message
            for i, text, reason, count in item["deltas"]:
                tokens += count
                entries = pending.pop(i, None)
                event = oa.chunk(rid, model, i, text, reason, chat, logprobs=entries, offset=offsets.get(i, 0))
                if call is not None:  # the text is the call's arguments
                    event["choices"][0]["delta"] = tools.delta(call, called, i, text)
                yield oa.sse(event)
                offsets[i] = offsets.get(i, 0) + sum(len(e["token"]) for e in entries or ())
    except Exception as e:  # cut mid-way (its replica died after tokens went out): an error event, no [DONE]
        error = e if isinstance(e, oa.ApiError) else internal_error(e)
        if isinstance(e, oa.ApiError):
            log.info(json.dumps({"request": rid, "status": e.status, "error": e.message[:200]}))
        elif stream.sent and streams.lost_replica(e):
            log.warning(json.dumps({"request": rid, "cut": type(e).__name__, "completion_tokens": tokens}))
            error = oa.ApiError(500, "the replica generating this response was lost mid-stream; repeat the request",
                                code="replica_lost")
        else:
            log.exception(f"request {rid} failed mid-stream")
        # the HTTP status went out as 200 with the first event: the metrics count the error's
        server.record(model, record["version"], error.status, started, record["prompt_tokens"], tokens)
        yield oa.sse(error.body())
        return
    finally:
        stream.cancel()  # a no-op once it ended; else (the client went away) its rows leave the batch
    use = oa.usage(record["prompt_tokens"], tokens)
    if include_usage:
        yield oa.sse(oa.usage_chunk(rid, model, use, chat))
    yield oa.sse("[DONE]")
    server.record(model, record["version"], 200, started, record["prompt_tokens"], tokens)
    server.answered_by(rid, record["version"])
    _log(record, use, started)


def _log(record: dict, use: dict, started: float) -> None:
    log.info(json.dumps(record | {"completion_tokens": use["completion_tokens"],
                                  "latency_s": round(time.monotonic() - started, 4)}))
