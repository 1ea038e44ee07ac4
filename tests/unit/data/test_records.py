"""Every validation rule and reason code, on single records (no Ray)."""

from __future__ import annotations

import json

import pytest

from raylab.config import Fields, ValidationConfig
from raylab.data.records import REASONS, RecordError, SourceRules, check, check_row, normalise
from raylab.data.sources.files import CsvDatasource
from raylab.data.sources.rows import parse_json_record

V = ValidationConfig()


def rules(fmt="completion", fields=None, **validation):
    return SourceRules(fmt, fields or Fields(), ValidationConfig(**validation))


def reason_of(payload, r):
    row = {"source": "s", "record_id": "r", "raw": json.dumps(payload), "payload": json.dumps(payload),
           "error": "", "error_message": ""}
    out = check_row(row, r, r.compiled())
    return out["reason"], out


def test_completion_ok():
    reason, out = reason_of({"text": "Acme pays on the 25th."}, rules())
    assert reason == "" and out["text"] == "Acme pays on the 25th." and out["messages"] == ""


def test_instruction_renders_messages_with_system_and_context():
    f = Fields(prompt="q", response="a", system="sys", context="ctx")
    reason, out = reason_of({"q": "When?", "a": "The 25th.", "sys": "Be brief.", "ctx": "Payroll FAQ"}, rules("instruction", f))
    assert reason == ""
    assert json.loads(out["messages"]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "When?\n\nPayroll FAQ"},
        {"role": "assistant", "content": "The 25th."},
    ]


def test_chat_accepts_a_json_string_column():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    reason, out = reason_of({"messages": json.dumps(msgs)}, rules("chat"))
    assert reason == "" and json.loads(out["messages"]) == msgs


@pytest.mark.parametrize(
    "payload, fmt, expected, kwargs",
    [
        ([1, 2], "completion", "not_an_object", {}),
        ({"body": "x"}, "completion", "missing_field", {}),
        ({"text": 5}, "completion", "wrong_type", {}),
        ({"text": "   \n"}, "completion", "empty_text", {}),
        ({"text": "hi"}, "completion", "too_short", {"min_chars": 5}),
        ({"text": "x" * 50}, "completion", "too_long", {"max_chars": 10}),
        ({"text": "call me, password=hunter2"}, "completion", "denied_pattern", {"deny_regex": [r"password\s*="]}),
        ({"text": "ok", "lang": ""}, "completion", "missing_field", {"required": ["lang"]}),
        ({"prompt": "q"}, "instruction", "missing_field", {}),
        ({"prompt": "q", "response": ""}, "instruction", "empty_text", {}),
        ({"messages": "not json"}, "chat", "wrong_type", {}),
        ({"messages": []}, "chat", "wrong_type", {}),
        ({"messages": [{"role": "user"}]}, "chat", "wrong_type", {}),
        ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "chat", "bad_role", {}),
        ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "chat", "bad_turn_order", {}),
        ({"messages": [{"role": "user", "content": "x"}]}, "chat", "bad_turn_order", {}),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "y"}]}, "chat", "bad_turn_order", {}),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}, "chat", "empty_text", {}),
    ],
)
def test_rejections(payload, fmt, expected, kwargs):
    reason, out = reason_of(payload, rules(fmt, **kwargs))
    assert reason == expected, out["message"]
    assert out["message"] and out["raw"]


def test_roles_are_configurable():
    msgs = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert reason_of(msgs, rules("chat", roles=["user", "assistant"]))[0] == ""
    assert reason_of(msgs, rules("chat", roles=["human", "assistant"]))[0] == "bad_role"


def test_parse_errors_keep_the_raw_bytes():
    bad_utf8 = parse_json_record("s", "f:3", b'{"text": "caf\xe9"}')
    assert bad_utf8["error"] == "invalid_utf8" and "\\xe9" in bad_utf8["raw"]
    bad_json = parse_json_record("s", "f:4", b'{"text": "unterminated')
    assert bad_json["error"] == "invalid_json" and bad_json["raw"] == '{"text": "unterminated'
    ok = parse_json_record("s", "f:5", '{"text": "café"}'.encode())
    assert ok["error"] == "" and json.loads(ok["payload"]) == {"text": "café"}


def test_row_errors_become_their_reason():
    row = {"source": "s", "record_id": "f:1", "raw": "x", "payload": "", "error": "invalid_csv", "error_message": "3 fields"}
    out = check_row(row, rules(), [])
    assert (out["reason"], out["message"]) == ("invalid_csv", "3 fields")


def test_every_reason_code_is_known():
    with pytest.raises(AssertionError):
        RecordError("made_up", "x")
    assert len(set(REASONS)) == len(REASONS)


def test_normalise_and_check_are_separate():
    text, messages = normalise({"text": "hello"}, rules())
    assert (text, messages) == ("hello", None)
    with pytest.raises(RecordError):
        check("", None, rules(), [])
    assert CsvDatasource._FILE_EXTENSIONS is None
