"""Chat tools with a forced call (raylab/serve/tools.py): what a request asks for becomes a
constraint on the answer, and the constrained answer becomes OpenAI's tool_calls; what is
not served (tool_choice auto, streaming `required`) is a 400 naming the argument; a named call
streams its arguments as OpenAI streams tool calls."""

from __future__ import annotations

import json

import pytest

from raylab.serve import openai_api as oa
from raylab.serve import tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "now"}}]


def chat(**extra) -> oa.ChatRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Oslo?"}], **extra}
    return oa.parse(oa.ChatRequest, json.dumps(body).encode())


def refused(**extra) -> oa.ApiError:
    with pytest.raises(oa.ApiError) as e:
        tools.plan(chat(**extra))
    return e.value


def test_a_named_function_constrains_the_answer_to_its_parameters():
    call = tools.plan(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert call == {"constraint": {"json": WEATHER}, "name": "get_weather"}
    (made,), finish = tools.shape(call, '{"city":"Oslo"}', "stop")
    assert made["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'} and finish == "stop"
    assert made["type"] == "function" and made["id"].startswith("call_")


def test_a_named_call_streams_its_id_and_name_first_then_its_arguments():
    call = tools.plan(chat(tools=TOOLS, stream=True, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    sent: set[int] = set()
    first = tools.delta(call, sent, 0, '{"ci')
    (made,) = first["tool_calls"]
    assert made["index"] == 0 and made["id"].startswith("call_") and made["type"] == "function"
    assert made["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert tools.delta(call, sent, 0, 'ty":"Oslo"}') == {"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]}
    assert tools.delta(call, sent, 0, "") == {}  # a finish without new text
    assert tools.delta(call, sent, 1, "")["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}


def test_required_is_an_array_of_the_tools_calls():
    call = tools.plan(chat(tools=TOOLS, tool_choice="required"))
    schema = call["constraint"]["json"]
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert [i["properties"]["name"] for i in schema["items"]["anyOf"]] == [{"const": "get_weather"}, {"const": "get_time"}]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}  # the default
    single = tools.plan(chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    assert single["constraint"]["json"]["maxItems"] == 1
    made, finish = tools.shape(call, json.dumps([{"name": "get_time", "parameters": {}},
                                                 {"name": "get_weather", "parameters": {"city": "Oslo"}}]), "stop")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in made] == \
        [("get_time", {}), ("get_weather", {"city": "Oslo"})] and finish == "tool_calls"
    assert tools.shape(call, '[{"name": "get_ti', "length") == (None, "length")  # cut: stays text


def test_what_is_not_served_is_a_400_naming_the_argument():
    assert tools.plan(chat()) is None and tools.plan(chat(tools=TOOLS, tool_choice="none")) is None
    e = refused(tools=TOOLS)  # OpenAI's default with tools is auto, and this endpoint has no parser
    assert e.param == "tool_choice" and "serve.vllm.tool_parser" in e.message and "'required'" in e.message
    assert refused(tool_choice="required").param == "tool_choice"
    e = refused(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_stock"}})
    assert e.param == "tool_choice" and "get_stock" in e.message and "get_weather" in e.message
    e = refused(tools=TOOLS, tool_choice="required", stream=True)
    assert e.param == "stream" and "name the function" in e.message
    assert refused(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}).param == "response_format"


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": None}, "messages.0"),
    ({"role": "tool", "content": "18 C"}, "messages.0"),
    ({"role": "user", "content": "x", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "f", "arguments": "{}"}}]}, "messages.0"),
])
def test_messages_with_tool_fields_are_checked(message, param):
    with pytest.raises(oa.ApiError) as e:
        oa.parse(oa.ChatRequest, json.dumps({"model": "m", "messages": [message]}).encode())
    assert e.value.param == param and e.value.status == 400


def test_a_conversation_with_a_call_and_its_result_renders_for_the_template():
    req = chat(messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}])
    rendered = [m.rendered() for m in req.messages]
    assert rendered[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert rendered[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}
    body = oa.completion("r", "m", [{"index": 0, "text": "{}", "finish_reason": "stop",
                                     "tool_calls": [{"id": "call_2", "type": "function",
                                                     "function": {"name": "get_time", "arguments": "{}"}}]}],
                         oa.usage(3, 2), chat=True)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}


def test_auto_with_a_parser_leaves_the_answer_free_and_finds_the_calls_in_it():
    """tool_choice auto (or none given) with serve.vllm.tool_parser: no constraint; vLLM's
    parser (hermes here) finds the calls a finished answer holds and the text around them; an
    answer without one (the control) and a cut one are left as text; streaming auto is a 400."""
    from raylab import models

    for extra in ({}, {"tool_choice": "auto"}):
        assert tools.plan(chat(tools=TOOLS, **extra), "hermes") == {"parser": "hermes"}
    with pytest.raises(oa.ApiError) as e:
        tools.plan(chat(tools=TOOLS, stream=True), "hermes")
    assert e.value.param == "stream"
    tok = models.build_byte_tokenizer()
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    texts = [call, "Let me look. " + call, "It is sunny.", call[:30]]
    found = tools.parsed({"parser": "hermes"}, tok, TOOLS, texts, ["stop", "stop", "stop", "length"])["tool_calls"]
    assert set(found) == {0, 1}  # the control (2) and the cut answer (3) stay text
    (made,), content = found[0]
    assert made["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'} and content is None
    assert made["type"] == "function" and made["id"]
    assert found[1][1] == "Let me look. "
    assert tools.parsed({"parser": "hermes"}, tok, TOOLS, ["It is sunny."], ["stop"]) == {}
    assert tools.parsed({"name": "get_weather", "constraint": {}}, tok, TOOLS, [call], ["stop"]) == {}  # forced: shape's
    assert not tools.keeps_special_tokens(None, tok, TOOLS)
    assert tools.keeps_special_tokens({"parser": "hermes"}, tok, TOOLS)  # hermes' markers may be special tokens
    with pytest.raises(ValueError, match="serve.vllm.tool_parser is 'hermess'.*hermes"):
        tools.check_parser("hermess")
    tools.check_parser("hermes")

