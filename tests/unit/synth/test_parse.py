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


def test_evolutions_and_their_responses_parse_strictly():
    assert parse.parse_instruction('{"instruction": " List three prime numbers above fifty. "}') == (
        "List three prime numbers above fifty.")
    assert parse.parse_response('{"response": "53, 59 and 61."}') == "53, 59 and 61."
    for text, reason in [('```json\n{"instruction": "List primes."}\n```', "not_json"),
                         ('{"instruction": "List primes.", "method": "deepen"}', "wrong_keys"),
                         ('{"instruction": ""}', "empty"), ('{"instruction": ["List primes."]}', "wrong_type"),
                         ('"List primes."', "wrong_shape")]:
        with pytest.raises(parse.Rejected) as e:
            parse.parse_instruction(text)
        assert e.value.reason == reason, text
    with pytest.raises(parse.Rejected) as e:
        parse.parse_response('{"answer": "53."}')  # the evolution's key is not the response's
    assert e.value.reason == "wrong_keys"


@pytest.mark.parametrize(("text", "reason"), [
    ('{"score": 4.5, "reason": "good"}', "wrong_type"),     # a grade the rubric does not have
    ('{"score": "5", "reason": "good"}', "wrong_type"),
    ('{"score": true, "reason": "good"}', "wrong_type"),    # a bool is an int in Python, not a grade
    ('{"score": 0, "reason": "bad"}', "out_of_range"),
    ('{"score": 6, "reason": "great"}', "out_of_range"),
    ('{"score": 5}', "wrong_keys"),
    ('Score: 5. {"score": 5, "reason": "fine"}', "not_json"),
])
def test_a_grade_is_an_integer_1_to_5_with_a_reason_or_rejected(text, reason):
    with pytest.raises(parse.Rejected) as e:
        parse.parse_grade(text)
    assert e.value.reason == reason


def test_well_formed_grades_parse():
    assert parse.parse_grade('{"score": 5, "reason": "Correct and complete."}') == (5, "Correct and complete.")
    assert parse.parse_grade('{"score": 1, "reason": ""}') == (1, "")
