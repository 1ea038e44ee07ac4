"""An uploaded chat JSONL file checked by the data stage's own rules before a fine-tuning job
is accepted (the fine-tuning service's `validating_files` step; raylab/serve/ftjobs.py).

    lines = parse_jsonl(data)                       # or raises ChatFileError naming the line
    report = check_chat_file(data, cfg.data, min_examples=10, reject_pii=False)
    report.ok, report.problems                      # every reason, with its line number

The rules are those of `records.check_row` (schema: a `messages` list of {role, content}, the
roles and turn order, lengths, deny patterns; PII found by the same detectors) and the
stage's exact-duplicate key (`dedup.content_of`). Near duplicates and token counts are left
to the job's data stage, which runs on the cluster with the tokenizer; here a request must be
answered in well under a second for a file of a few thousand lines.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from raylab.data import records
from raylab.data.dedup import content_of

MAX_PROBLEMS = 20  # reported per file; the count says how many more there were


class ChatFileError(ValueError):
    """A file that is not JSON lines: the message names the first bad line."""


def parse_jsonl(data: bytes) -> list[str]:
    """The file's non-blank lines, each checked to be a JSON object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatFileError(f"the file is not UTF-8 text (byte {e.start})") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatFileError(f"line {number} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise ChatFileError(f"line {number} is a JSON {type(value).__name__}, expected an object")
        lines.append(line)
    if not lines:
        raise ChatFileError("the file holds no JSON lines")
    return lines


@dataclass
class ChatFileReport:
    """What the rules found: valid and distinct examples, each problem `line N: reason: message`."""

    examples: int = 0
    valid: int = 0
    duplicates: int = 0
    pii: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    more: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def note(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.more += 1

    def message(self) -> str:
        extra = f" (and {self.more} more)" if self.more else ""
        return "; ".join(self.problems) + extra


def check_chat_file(data: bytes, data_cfg, min_examples: int, reject_pii: bool = False) -> ChatFileReport:
    """Check `data` (chat JSONL) with `data_cfg`'s validation, clean and pii rules (a
    DataConfig); a malformed file is a ChatFileError."""
    lines = parse_jsonl(data)
    rules = records.SourceRules(format="chat", fields=data_cfg.fields, validation=data_cfg.validation,
                                clean=data_cfg.clean, pii=data_cfg.pii)
    deny, detectors = rules.compiled(), rules.detectors()
    report, seen = ChatFileReport(examples=len(lines)), set()
    for number, line in enumerate(lines, 1):
        row = {"source": "upload", "record_id": str(number), "raw": line, "payload": line, "error": ""}
        out = records.check_row(row, rules, deny, detectors)
        if out["reason"]:
            report.note(f"example {number}: {out['reason']}: {out['message']}")
            continue
        if out["pii"]:
            found = json.loads(out["pii"])
            for kind, n in found.items():
                report.pii[kind] = report.pii.get(kind, 0) + n
            if reject_pii:
                report.note(f"example {number}: personal data ({', '.join(sorted(found))}; api.on_pii is reject)")
                continue
        key = hashlib.sha256(content_of(out["text"], out["messages"]).encode()).hexdigest()
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        report.valid += 1
    if report.valid < min_examples:
        report.problems.insert(0, f"{report.valid} valid, distinct examples; at least {min_examples} are needed "
                                  f"({report.examples} read, {report.duplicates} duplicates)")
    return report
