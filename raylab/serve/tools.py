"""Chat `tools` with a forced call: `tool_choice: "required"` or a named function, answered
as OpenAI's `tool_calls` through constrained decoding (vLLM's structured outputs; a version
on the transformers engine answers a 400 naming the engine, as for response_format).

    call = plan(req)                  # None, or {"constraint": ..., "name"/"required": ...}
    tool_calls, finish = shape(call, text, finish_reason)

A named function's answer is constrained to its `parameters` schema: the answer is the
call's arguments. `required` constrains the answer to a JSON array of {"name", "parameters"}
objects, one of the tools each (one item when parallel_tool_calls is false), as vLLM's own
server does. `tool_choice: "auto"` (OpenAI's default when tools are given) would need a parser
for the model family's own tool-call format, which raylab does not have: a 400 that says
what to send instead. The tools are rendered into the prompt by the version's chat template
where it takes them (a template that ignores them still gets a call that fits the schema).
Streaming a forced call is not served (a 400): its arguments would need incremental JSON.
"""

from __future__ import annotations

import json
import uuid

from raylab.serve import openai_api as oa


def plan(req: oa.ChatRequest) -> dict | None:
    """The forced call a chat request asks for, or None; ApiError(400) naming what is wrong."""
    choice = req.tool_choice
    if req.tools is None:
        if choice not in (None, "none"):
            raise oa.ApiError(400, "tool_choice needs tools", "tool_choice", "invalid_value")
        return None
    if choice is None or choice == "auto":
        raise oa.ApiError(400, "tool_choice 'auto' (the default with tools) needs a parser for the model's own "
                               "tool-call format, which raylab does not have: send tool_choice 'required', a named "
                               "function ({'type': 'function', 'function': {'name': ...}}) or 'none'",
                          "tool_choice", "unsupported_value")
    if choice == "none":
        return None
    if req.response_format is not None and req.response_format.type != "text":
        raise oa.ApiError(400, "response_format and a forced tool call both constrain the answer: send one",
                          "response_format", "invalid_value")
    if req.stream:
        raise oa.ApiError(400, "streaming a forced tool call is not served: send stream false", "stream",
                          "unsupported_value")
    tools = {t.function.name: t.function for t in req.tools}
    if choice == "required":
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


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}
