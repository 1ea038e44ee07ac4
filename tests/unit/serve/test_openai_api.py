"""Unit tests for the serve stage's request parsing (OpenAI's error shapes) and for the
per-replica version handle that Serve's LRU evicts (an adapter in use leaves the base only
when its last request ends)."""

from __future__ import annotations

import json

import pytest

from raylab.serve import openai_api as oa
from raylab.serve.generator import Held, Loaded


def parse_error(kind, body) -> oa.ApiError:
    with pytest.raises(oa.ApiError) as e:
        oa.parse(kind, body if isinstance(body, bytes) else json.dumps(body).encode())
    return e.value


def test_requests_parse_with_openai_defaults():
    req = oa.parse(oa.ChatRequest, json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}], "stop": "END"}).encode())
    assert req.messages[0].text() == "hi there" and req.stop == ["END"] and req.temperature == 1.0 and req.n == 1
    done = oa.parse(oa.CompletionRequest, b'{"model": "m", "prompt": ["a", "b"], "max_tokens": 3, "seed": 4}')
    assert done.prompt == ["a", "b"] and done.max_tokens == 3 and done.seed == 4 and done.stop is None


@pytest.mark.parametrize("body,param,code", [
    (b"{not json", None, None),
    (b'"a string"', None, None),
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "missing_required_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 99}, "n", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {}}, "logit_bias", None),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content.str", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format.type", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
     "response_format", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra", None),
])
def test_bad_requests_name_the_parameter(body, param, code):
    e = parse_error(oa.ChatRequest, body)
    assert e.status == 400 and e.param == param and e.code == code
    assert set(e.body()["error"]) == {"message", "type", "param", "code"} and e.body()["error"]["type"] == "invalid_request_error"


def test_response_format_becomes_an_engine_neutral_constraint():
    def constraint(fmt):
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": fmt}
        return oa.parse(oa.ChatRequest, json.dumps(body).encode()).response_format.constraint()

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert constraint({"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}) \
        == {"json": schema}
    assert constraint({"type": "json_object"}) == {"json_object": True}
    assert constraint({"type": "text"}) is None
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert oa.parse(oa.ChatRequest, json.dumps(chat | {"logprobs": True, "top_logprobs": 3}).encode()).logprobs_wanted() == 3
    assert oa.parse(oa.ChatRequest, json.dumps(chat | {"logprobs": True}).encode()).logprobs_wanted() == 0
    assert oa.parse(oa.ChatRequest, json.dumps(chat | {"logprobs": False}).encode()).logprobs_wanted() is None
    e = parse_error(oa.ChatRequest, chat | {"top_logprobs": 3})  # OpenAI's rule: top_logprobs needs logprobs
    assert e.param == "top_logprobs" and "top_logprobs needs logprobs: true" in e.message
    assert parse_error(oa.ChatRequest, chat | {"logprobs": True, "top_logprobs": 21}).param == "top_logprobs"
    # OpenAI's completions API has no response_format: a 400 naming it, as any unknown argument
    e = parse_error(oa.CompletionRequest, {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}})
    assert e.param == "response_format" and "Unrecognized" in e.message


def test_error_types_follow_openai():
    assert oa.ApiError(401, "x").type == "authentication_error"
    assert oa.ApiError(404, "x").type == "invalid_request_error"
    assert oa.ApiError(500, "x").type == "server_error"
    assert oa.sse("[DONE]") == "data: [DONE]\n\n"


class FakeTok:
    eos_token_id = 1


def test_an_evicted_version_unloads_only_after_its_last_request():
    unloaded = []
    loaded = Loaded("m/1", object(), FakeTok(), "a0", unloaded.append)
    assert loaded.hold()
    held = Held(loaded)  # what Serve's LRU keeps
    loaded.acquire()
    loaded.acquire()
    held.__del__()  # Serve's LRU evicts it while two requests still decode with it
    assert unloaded == []
    loaded.release()
    assert unloaded == []
    loaded.release()
    assert unloaded == [loaded]
    held.__del__()  # garbage collection later: nothing twice
    assert unloaded == [loaded]
    idle = Loaded("m/2", object(), FakeTok(), "a1", unloaded.append)
    assert idle.hold()
    Held(idle).__del__()
    assert unloaded[-1] is idle


def test_completions_logprobs_take_the_legacy_shape():
    """`logprobs: k` on /v1/completions: OpenAI's legacy object, built from the same entries as
    chat's; text_offset counts over the token strings and goes on across a stream's events."""
    prompt = {"model": "m", "prompt": "x"}
    assert oa.parse(oa.CompletionRequest, json.dumps(prompt | {"logprobs": 2}).encode()).logprobs_wanted() == 2
    assert oa.parse(oa.CompletionRequest, json.dumps(prompt).encode()).logprobs_wanted() is None
    assert parse_error(oa.CompletionRequest, prompt | {"logprobs": 6}).param == "logprobs"  # OpenAI's maximum is 5

    def entry(token, lp, *top):
        return {"token": token, "logprob": lp, "bytes": list(token.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}

    entries = [entry("It", -0.1, ("It", -0.1), ("The", -2.5)), entry(" ships", -0.2, (" ships", -0.2), (" is", -3.0)),
               entry("é", -1.0, ("é", -1.0), ("e", -1.5))]
    whole = oa.completion("cmpl-1", "m", [{"index": 0, "text": "It shipsé", "finish_reason": "length",
                                           "logprobs": entries}], oa.usage(1, 3), chat=False)
    legacy = whole["choices"][0]["logprobs"]
    assert legacy == {"tokens": ["It", " ships", "é"], "token_logprobs": [-0.1, -0.2, -1.0],
                      "top_logprobs": [{"It": -0.1, "The": -2.5}, {" ships": -0.2, " is": -3.0}, {"é": -1.0, "e": -1.5}],
                      "text_offset": [0, 2, 8]}
    later = oa.chunk("cmpl-1", "m", 0, "é", None, chat=False, logprobs=entries[2:], offset=8)
    assert later["choices"][0]["logprobs"]["text_offset"] == [8]
    # the control: without logprobs asked, the field is null (not an empty object)
    assert oa.completion("cmpl-2", "m", [{"index": 0, "text": "a", "finish_reason": "stop"}], oa.usage(1, 1),
                         chat=False)["choices"][0]["logprobs"] is None
    assert oa.chunk("cmpl-2", "m", 0, "a", None, chat=False)["choices"][0]["logprobs"] is None
