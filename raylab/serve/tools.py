"""Chat `tools` with a forced call: `tool_choice: "required"` or a named function, answered
as OpenAI's `tool_calls` through constrained decoding (vLLM's structured outputs; a version
on the transformers engine answers a 400 naming the engine, as for response_format).

    call = plan(req)                  # None, or {"constraint": ..., "name"/"required": ...}
    tool_calls, finish = shape(call, text, finish_reason)

A named function's answer is constrained to its `parameters` schema: the answer is the
call's arguments. `required` constrains the answer to a JSON array of {"name", "parameters"}
objects, one of the tools each (one item when parallel_tool_calls is false), as vLLM's own
server does. `tool_choice: "auto"` (OpenAI's default when tools are given) leaves the answer
free and finds the calls the model wrote in its family's own format: that takes the family's
parser, `serve.vllm.tool_parser` (vLLM's parsers, by `vllm serve --tool-call-parser`'s names:
hermes, llama3_json, mistral, pythonic, ...; `parsed` runs it on the replica, which has the
version's tokenizer). Without one, auto is a 400 that says what to send instead. The tools
are rendered into the prompt by the version's chat template where it takes them (a template
that ignores them still gets a forced call that fits the schema; an auto call then comes only
from what the model learned).
A named call streams (its arguments are the text, so each text delta is an arguments delta,
`delta`); streaming `required` is a 400: splitting its array into calls as it grows would need
incremental JSON parsing.

    delta(call, sent, choice, text)   # a streamed event's delta: the call's id and name first
"""

from __future__ import annotations

import json
import uuid

from raylab.serve import openai_api as oa


def plan(req: oa.ChatRequest, parser: str | None = None) -> dict | None:
    """The call a chat request asks for: forced ({"constraint", "name" | "required"}), auto
    ({"parser"}: `parser` is serve.vllm.tool_parser), or None; ApiError(400) naming what is wrong."""
    choice = req.tool_choice
    if req.tools is None:
        if choice not in (None, "none"):
            raise oa.ApiError(400, "tool_choice needs tools", "tool_choice", "invalid_value")
        return None
    if choice is None or choice == "auto":
        if parser is None:
            raise oa.ApiError(400, "tool_choice 'auto' (the default with tools) needs a parser for the model's own "
                                   "tool-call format, and this endpoint has none (serve.vllm.tool_parser): send "
                                   "tool_choice 'required', a named function ({'type': 'function', 'function': "
                                   "{'name': ...}}) or 'none'", "tool_choice", "unsupported_value")
        if req.stream:
            raise oa.ApiError(400, "streaming tool_choice 'auto' is not served: send stream false, or name the "
                                   "function", "stream", "unsupported_value")
        return {"parser": parser}
    if choice == "none":
        return None
    if req.response_format is not None and req.response_format.type != "text":
        raise oa.ApiError(400, "response_format and a forced tool call both constrain the answer: send one",
                          "response_format", "invalid_value")
    tools = {t.function.name: t.function for t in req.tools}
    if choice == "required":
        if req.stream:
            raise oa.ApiError(400, "streaming tool_choice 'required' is not served: send stream false, or name the "
                                   "function (a named call streams)", "stream", "unsupported_value")
        items = [{"type": "object", "properties": {"name": {"const": name}, "parameters": fn.parameters},
                  "required": ["name", "parameters"], "additionalProperties": False} for name, fn in tools.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return {"constraint": {"json": schema}, "required": True}
    name = choice.function.name
    if name not in tools:
        raise oa.ApiError(400, f"tool_choice names function '{name}', which is not in tools ({', '.join(tools)})",
                          "tool_choice", "invalid_value")
    return {"constraint": {"json": tools[name].parameters}, "name": name}


def shape(call: dict, text: str, finish: str | None) -> tuple[list[dict] | None, str | None]:
    """(tool_calls, finish_reason) of a choice generated under `call`'s constraint: a named
    function's arguments are the text (finish "stop", as OpenAI's forced call); `required`'s
    array becomes one call per item (finish "tool_calls"). A cut answer (finish "length")
    stays text: its JSON is unfinished."""
    if finish == "length":
        return None, finish
    if "name" in call:
        return [_call(call["name"], text)], finish
    return [_call(item["name"], json.dumps(item["parameters"])) for item in json.loads(text)], "tool_calls"


def delta(call: dict, sent: set[int], choice: int, text: str) -> dict:
    """A streamed event's delta for a named call's choice: its first carries the call's id,
    type and name (then `choice` is in `sent`), every one the arguments' new text, as OpenAI
    streams tool calls; {} when there is nothing new."""
    if choice in sent:
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
    sent.add(choice)
    return {"tool_calls": [{"index": 0, **_call(call["name"], text)}]}


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def check_parser(name: str) -> None:
    """ValueError naming serve.vllm.tool_parser when vLLM has no parser of that name."""
    from vllm.tool_parsers import ToolParserManager

    known = ToolParserManager.list_registered()
    if name not in known:
        raise ValueError(f"serve.vllm.tool_parser is {name!r}, which vLLM does not have; its parsers: "
                         + ", ".join(sorted(known)))


def _parser(name: str, tok, tools: list[dict]):
    """vLLM's parser for these tools and the request it adjusts, as its own server makes them."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    request = ChatCompletionRequest(model="raylab", messages=[{"role": "user", "content": ""}], tools=tools,
                                    tool_choice="auto")
    parser = ToolParserManager.get_tool_parser(name)(tok, request.tools)
    return parser, parser.adjust_request(request)


def keeps_special_tokens(call: dict | None, tok, tools: list[dict] | None) -> bool:
    """Whether an auto call's answer keeps special tokens in its text: some families' call
    markers are special tokens, which the parser must see (its own adjust_request says)."""
    if call is None or "parser" not in call:
        return False
    return not _parser(call["parser"], tok, tools or [])[1].skip_special_tokens


def parsed(call: dict | None, tok, tools: list[dict] | None, texts: list[str], reasons: list) -> dict:
    """{"tool_calls": {choice: (calls, content)}} for the finished choices of an auto call in
    which the parser found calls (OpenAI's tool_calls, and the text around them or None), or {}."""
    if call is None or "parser" not in call:
        return {}
    parser, request = _parser(call["parser"], tok, tools or [])
    found = {}
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        if reason == "length":  # cut: a call in it is unfinished
            continue
        info = parser.extract_tool_calls(text, request)
        if info.tools_called and info.tool_calls:
            found[i] = ([{"id": c.id, "type": "function",
                          "function": {"name": c.function.name, "arguments": c.function.arguments}}
                         for c in info.tool_calls], info.content or None)
    return {"tool_calls": found} if found else {}
