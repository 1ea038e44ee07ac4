"""The generators' answers are parsed strictly: the one JSON object asked for, or a rejection
with a reason code (never a looser reading)."""

from __future__ import annotations

import json

import pytest

from raylab.synth import parse


def test_a_well_formed_answer_parses():
    text = json.dumps({"pairs": [{"question": "When do widgets ship?", "answer": "Within two days."}]})
    assert parse.parse_pairs(text, most=2) == [{"question": "When do widgets ship?", "answer": "Within two days."}]
    assert parse.parse_instructions('{"instructions": ["Name a colour.", "Add 2 and 3."]}', most=2) == [
        "Name a colour.", "Add 2 and 3."]
    assert parse.parse_output('{"input": "", "output": "Blue."}') == {"input": "", "output": "Blue."}


@pytest.mark.parametrize(("text", "reason"), [
    ('```json\n{"instructions": ["Name a colour."]}\n```', "not_json"),   # fenced: not what was asked
    ('Sure! {"instructions": ["Name a colour."]}', "not_json"),           # prose around it
    ('["Name a colour."]', "wrong_shape"),
    ('{"instructions": ["Name a colour."], "note": "hi"}', "wrong_keys"),
    ('{"instructions": []}', "wrong_type"),
    ('{"instructions": ["a", "b", "c"]}', "too_many"),
    ('{"instructions": [""]}', "empty"),
    ('{"instructions": [7]}', "wrong_type"),
])
def test_anything_else_is_rejected_with_its_reason(text, reason):
    with pytest.raises(parse.Rejected) as e:
        parse.parse_instructions(text, most=2)
    assert e.value.reason == reason


def test_pairs_and_outputs_need_exactly_their_keys():
    with pytest.raises(parse.Rejected) as e:
        parse.parse_pairs('{"pairs": [{"question": "Q?", "answer": "A.", "source": "x"}]}', most=2)
    assert e.value.reason == "wrong_keys"
    with pytest.raises(parse.Rejected) as e:
        parse.parse_output('{"output": "Blue."}')
    assert e.value.reason == "wrong_keys"
    with pytest.raises(parse.Rejected) as e:
        parse.parse_output('{"input": "", "output": "  "}')
    assert e.value.reason == "empty"
