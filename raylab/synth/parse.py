"""Strict parsers of the generators' answers: the whole answer must be the one JSON object the
prompt asked for. Nothing is fished out of surrounding prose or code fences, and no key is
guessed: an answer that does not follow the format raises Rejected with a reason code, which
the datasheet counts. (A model that wraps its JSON in ``` is telling us it does not follow
the prompt; loosening the parser would let its other deviations through too.)

    pairs = parse_pairs(text, most=2)        # [{"question", "answer"}]
    instructions = parse_instructions(text, most=8)
    example = parse_output(text)             # {"input", "output"}
    evolved = parse_instruction(text)        # evol_instruct: the evolved instruction
    response = parse_response(text)          # evol_instruct: its answer
    score, reason = parse_grade(text)        # the judge: an integer 1..5 and its reason
"""

from __future__ import annotations

import json


class Rejected(ValueError):
    """An answer that does not follow its generator's format; `reason` is the datasheet's code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _object(text: str, keys: set[str]) -> dict:
    try:
        value = json.loads(text.strip())
    except ValueError as e:
        raise Rejected("not_json", str(e)) from None
    if not isinstance(value, dict):
        raise Rejected("wrong_shape", f"expected a JSON object, got {type(value).__name__}")
    if set(value) != keys:
        raise Rejected("wrong_keys", f"expected keys {sorted(keys)}, got {sorted(value)}")
    return value


def _text(value, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"{what} should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise Rejected("empty", f"{what} is empty")
    return value.strip()


def _list(value, what: str, most: int) -> list:
    if not isinstance(value, list) or not value:
        raise Rejected("wrong_type", f"{what} should be a non-empty list")
    if len(value) > most:
        raise Rejected("too_many", f"{what} has {len(value)} items; {most} were asked for")
    return value


def parse_pairs(text: str, most: int) -> list[dict[str, str]]:
    """grounded_qa: {"pairs": [{"question": str, "answer": str}, ...]} with 1..most pairs."""
    pairs = _list(_object(text, {"pairs"})["pairs"], "pairs", most)
    out = []
    for i, p in enumerate(pairs):
        if not isinstance(p, dict) or set(p) != {"question", "answer"}:
            raise Rejected("wrong_keys", f"pairs[{i}] should be an object with exactly question and answer")
        out.append({"question": _text(p["question"], f"pairs[{i}].question"),
                    "answer": _text(p["answer"], f"pairs[{i}].answer")})
    return out


def parse_instructions(text: str, most: int) -> list[str]:
    """self_instruct, step 1: {"instructions": [str, ...]} with 1..most instructions."""
    items = _list(_object(text, {"instructions"})["instructions"], "instructions", most)
    return [_text(x, f"instructions[{i}]") for i, x in enumerate(items)]


def parse_output(text: str) -> dict[str, str]:
    """self_instruct, step 2: {"input": str (may be empty), "output": str}."""
    value = _object(text, {"input", "output"})
    return {"input": _text(value["input"], "input", allow_empty=True), "output": _text(value["output"], "output")}


def parse_instruction(text: str) -> str:
    """evol_instruct, the evolution: {"instruction": str}."""
    return _text(_object(text, {"instruction"})["instruction"], "instruction")


def parse_response(text: str) -> str:
    """evol_instruct, the evolved instruction's answer: {"response": str}."""
    return _text(_object(text, {"response"})["response"], "response")


def parse_grade(text: str, lowest: int = 1, highest: int = 5) -> tuple[int, str]:
    """The judge: {"score": an integer lowest..highest, "reason": str}. A float, a numeric
    string or a bool is not an integer grade (4.5 would be a grade the rubric does not have)."""
    value = _object(text, {"score", "reason"})
    score = value["score"]
    if not isinstance(score, int) or isinstance(score, bool):
        raise Rejected("wrong_type", f"score should be an integer, got {type(score).__name__}")
    if not lowest <= score <= highest:
        raise Rejected("out_of_range", f"score {score} is outside {lowest}..{highest}")
    return score, _text(value["reason"], "reason", allow_empty=True)
