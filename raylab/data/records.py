"""One record: parse, normalise to a format, check the validation rules.

Pure Python (no Ray) so each rule is unit-testable; the data stage maps `check_batch` over
Ray Data batches. Every record ends as exactly one of:

    accepted:   {source, record_id, format, text, messages}
                completion -> `text`; instruction and chat -> `messages`, a JSON list of
                {role, content} (instruction: [system?], user = prompt (+ context), assistant
                = response), rendered later with the tokenizer's chat template.
    quarantine: {source, record_id, reason, message, raw}
                `raw` is the record as read (needed to fix it). The quarantine holds
                whatever the source held, personal data included: treat it as sensitive.

Order per record: parse -> normalise to the format -> clean (Unicode form, whitespace) ->
check the rules -> redact PII (typed placeholders, counted in `pii`). Redaction comes
before anything is written to the accepted outputs.

Reason codes: invalid_utf8, invalid_json, invalid_csv, not_an_object,
missing_field, wrong_type, empty_text, too_short, too_long, bad_role, bad_turn_order,
denied_pattern, and too_many_tokens (from tokenization, raylab/packing.py).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from raylab.config import CleanConfig, Fields, PiiConfig, ValidationConfig
from raylab.core import detectors as pii

REASONS = (
    "invalid_utf8", "invalid_json", "invalid_csv", "not_an_object", "missing_field",
    "wrong_type", "empty_text", "too_short", "too_long", "bad_role", "bad_turn_order", "denied_pattern",
    "too_many_tokens",
)


class RecordError(Exception):
    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SourceRules:
    """What the data stage knows about one source when checking its records."""

    format: str
    fields: Fields
    validation: ValidationConfig
    clean: CleanConfig = field(default_factory=CleanConfig)
    pii: PiiConfig = field(default_factory=lambda: PiiConfig(enabled=False))
    # The run's pseudonym key (data.pii.pseudonymize): drawn by the stage's driver, shipped to
    # the tasks inside the rules, never written.
    pseudonym_key: bytes | None = field(default=None, repr=False)

    def compiled(self) -> list[re.Pattern]:
        return [re.compile(p) for p in self.validation.deny_regex]

    def detectors(self) -> list[pii.Detector]:
        if not self.pii.enabled:
            return []
        return pii.for_engine(self.pii.types, self.pii.engine, self.pii.regions)

    def pseudonyms(self) -> pii.Pseudonyms | None:
        if self.pii.enabled and self.pii.pseudonymize and self.pseudonym_key:
            return pii.Pseudonyms(self.pseudonym_key)
        return None


_CONTROL = re.compile(r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b-\u200d\u2060\ufeff]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, cfg: CleanConfig) -> str:
    """Unicode normal form; unified line ends; no control or zero-width characters; no
    trailing spaces; at most one blank line in a row; trimmed."""
    if cfg.unicode:
        text = unicodedata.normalize(cfg.unicode, text)
    if cfg.whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _CONTROL.sub("", text)
        text = _BLANK_LINES.sub("\n\n", _TRAILING.sub("\n", text)).strip()
    return text


def _field(payload: dict, name: str, required: bool = True) -> str | None:
    if name not in payload or payload[name] is None:
        if required:
            raise RecordError("missing_field", f"field {name!r} is missing")
        return None
    value = payload[name]
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"field {name!r} should be a string, got {type(value).__name__}")
    return value


def _messages(payload: dict, fields: Fields) -> list[dict[str, str]]:
    if fields.messages not in payload or payload[fields.messages] is None:
        raise RecordError("missing_field", f"field {fields.messages!r} is missing")
    value = payload[fields.messages]
    if isinstance(value, str):  # a JSON column from SQL or CSV
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError("wrong_type", f"field {fields.messages!r} is a string that is not JSON ({e.msg})") from None
    if not isinstance(value, list) or not value:
        raise RecordError("wrong_type", f"field {fields.messages!r} should be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordError("wrong_type", f"message {i} should be {{role: str, content: str}}, got {str(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def normalise(payload: Any, rules: SourceRules) -> tuple[str, list[dict[str, str]] | None]:
    """(text, messages) for a parsed record; raises RecordError with a reason code."""
    if not isinstance(payload, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(payload).__name__}")
    for name in rules.validation.required:
        if payload.get(name) in (None, ""):
            raise RecordError("missing_field", f"required field {name!r} is missing or empty")
    f = rules.fields
    if rules.format == "completion":
        return _field(payload, f.text), None
    if rules.format == "instruction":
        prompt, response = _field(payload, f.prompt), _field(payload, f.response)
        system = _field(payload, f.system, required=False) if f.system else None
        context = _field(payload, f.context, required=False) if f.context else None
        user = f"{prompt}\n\n{context}" if context else prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": response},
        ]
        return "", messages
    return "", _messages(payload, f)


def check_turns(messages: list[dict[str, str]], roles: list[str]) -> None:
    """Roles allowed; optional leading system; user/assistant alternate; ends with assistant."""
    for i, m in enumerate(messages):
        if m["role"] not in roles:
            raise RecordError("bad_role", f"message {i} has role {m['role']!r}; allowed: {', '.join(roles)}")
    turns = [m["role"] for m in messages]
    if turns and turns[0] == "system":
        turns = turns[1:]
    if not turns or "system" in turns:
        raise RecordError("bad_turn_order", "a system message may only come first, and a conversation needs turns")
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError("bad_turn_order", f"turn {i} is {role!r}, expected {expected!r} (user and assistant alternate)")
    if turns[-1] != "assistant":
        raise RecordError("bad_turn_order", "the conversation must end with an assistant turn (nothing to learn otherwise)")


def check(text: str, messages: list[dict[str, str]] | None, rules: SourceRules, deny: list[re.Pattern]) -> None:
    """The content rules: non-empty, length bounds, turn order, deny-list."""
    v = rules.validation
    if messages is not None:
        check_turns(messages, v.roles)
        if any(not m["content"].strip() for m in messages if m["role"] != "system"):
            raise RecordError("empty_text", "a user or assistant message is empty")
        body = "\n".join(m["content"] for m in messages)
    else:
        body = text
    if not body.strip():
        raise RecordError("empty_text", "the text is empty")
    if len(body) < v.min_chars:
        raise RecordError("too_short", f"{len(body)} characters, fewer than validation.min_chars={v.min_chars}")
    if len(body) > v.max_chars:
        raise RecordError("too_long", f"{len(body)} characters, more than validation.max_chars={v.max_chars}")
    for pattern in deny:
        if pattern.search(body):
            raise RecordError("denied_pattern", f"matches validation.deny_regex {pattern.pattern!r}")


def _redact(text: str, detectors: list[pii.Detector], counts: dict[str, int], pseudonyms=None) -> str:
    text, found = pii.redact(text, detectors, pseudonyms)
    for kind, n in found.items():
        counts[kind] = counts.get(kind, 0) + n
    return text


def check_row(
    row: dict[str, Any], rules: SourceRules, deny: list[re.Pattern], detectors: list[pii.Detector] = ()
) -> dict[str, Any]:
    """A raw row from a source -> an output row with `reason` '' (accepted) or a code."""
    out = {"source": row["source"], "record_id": row["record_id"], "raw": row["raw"],
           "format": rules.format, "text": "", "messages": "", "reason": "", "message": "", "pii": ""}
    try:
        if row["error"]:
            raise RecordError(row["error"], row["error_message"])
        text, messages = normalise(json.loads(row["payload"]), rules)
        text = clean_text(text, rules.clean)
        if messages is not None:
            messages = [{"role": m["role"], "content": clean_text(m["content"], rules.clean)} for m in messages]
        check(text, messages, rules, deny)
        counts: dict[str, int] = {}
        names = rules.pseudonyms()
        out["text"] = _redact(text, detectors, counts, names)
        if messages is not None:
            redacted = [{"role": m["role"], "content": _redact(m["content"], detectors, counts, names)}
                        for m in messages]
            out["messages"] = json.dumps(redacted, ensure_ascii=False)
        out["pii"] = json.dumps(counts) if counts else ""
    except RecordError as e:
        out["reason"], out["message"] = e.reason, e.message
    return out
