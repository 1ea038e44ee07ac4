"""The quickstart corpus through the data stage's per-record path (`records.check_row`, with
the quickstart config's rules): no accepted record still names a customer. Customers are
counted against the names examples/acme/generate.py inserted (its NAMES), not with the
detector, and every other personal datum it inserted is gone too.

Ray is not needed: the stage maps exactly this function over its batches
(tests/integration/test_data.py runs the stage itself)."""

from __future__ import annotations

import csv
import importlib.util
import json
import re

from conftest import REPO
from raylab import config
from raylab.data import records
from raylab.data.sources import source_rules

ACME = REPO / "examples" / "acme"


def generator():
    spec = importlib.util.spec_from_file_location("acme_generate", ACME / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # definitions only; writing happens under __main__
    return module


def payloads(name: str):
    if name == "faq":
        with open(ACME / "faq.csv", newline="", encoding="utf-8") as f:
            yield from (row for row in csv.DictReader(f) if None not in row)
    elif name == "support":
        for line in (ACME / "support_chats.jsonl").read_bytes().splitlines():
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # the corpus's broken lines: quarantined by the stage
    else:
        for page in sorted((ACME / "handbook").glob("*.md")):
            try:
                yield {"text": page.read_text(encoding="utf-8")}
            except UnicodeDecodeError:
                continue


def accepted_texts() -> list[str]:
    cfg = config.load(REPO / "configs" / "quickstart.yaml")
    out = []
    for src in cfg.data.sources:
        rules = source_rules(src, cfg.data)
        for i, payload in enumerate(payloads(src.name)):
            row = records.check_row({"source": src.name, "record_id": str(i), "raw": "", "payload": json.dumps(payload),
                                     "error": "", "error_message": ""}, rules, rules.compiled(), rules.detectors())
            if not row["reason"]:
                out.append(row["text"] + "\n" + "\n".join(m["content"] for m in json.loads(row["messages"] or "[]")))
    return out


def mentions(text: str, names: list[str]) -> list[str]:
    parts = {p for n in names for p in [n, *n.split()]}
    return [p for p in parts if re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text)]


def test_no_accepted_quickstart_record_names_a_customer():
    gen = generator()
    texts = accepted_texts()
    named_in_source = [p for p in payloads("support") if mentions(json.dumps(p), gen.NAMES)]
    assert len(texts) > 250 and len(named_in_source) > 100  # the corpus as generated: names to find
    leaks = {t: mentions(t, gen.NAMES) for t in texts if mentions(t, gen.NAMES)}
    assert leaks == {}, f"{len(leaks)} accepted records still name a customer: {list(leaks.items())[:3]}"
    # Everything else the generator planted (its PII list) is gone as well.
    planted = ["@example.com", "+1 415 555", "4111 1111 1111 1111", "DE89 3704", "203.0.113.", "sk-test4f9a8b7c6d5e4f3a2b1c"]
    assert not [p for p in planted for t in texts if p in t]
    assert sum("<PERSON>" in t for t in texts) >= len(named_in_source) - 10  # the names became placeholders


def test_pseudonymized_records_keep_one_placeholder_per_customer_within_a_run():
    import dataclasses

    cfg = config.load(REPO / "configs" / "quickstart.yaml", ["data.pii.pseudonymize=true"])
    src = cfg.data.sources[1]  # the support chats
    chat = {"messages": [{"role": "user", "content": "Hi, this is Sam Rivera. My badge is lost."},
                         {"role": "assistant", "content": "Sorry to hear that, Sam Rivera. Reception replaces it."}]}

    def redacted(key: bytes) -> list[str]:
        rules = dataclasses.replace(source_rules(src, cfg.data), pseudonym_key=key)
        rows = [records.check_row({"source": "support", "record_id": str(i), "raw": "", "payload": json.dumps(chat),
                                   "error": "", "error_message": ""}, rules, rules.compiled(), rules.detectors())
                for i in range(2)]
        return [re.findall(r"<PERSON_[A-Z]{4}>", r["messages"]) for r in rows]

    first_run = redacted(b"a" * 32)
    assert len(set(sum(first_run, []))) == 1 and len(first_run[0]) == 2  # both turns, both records: one pseudonym
    assert redacted(b"b" * 32)[0] != first_run[0]  # another run, another key
