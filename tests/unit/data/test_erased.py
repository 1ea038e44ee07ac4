"""Suppressed records in the data stage's per-batch functions (no Ray: the stage maps exactly
these): an erased record keeps only its id, is neither accepted nor quarantined, and the
suppression list is part of the cache key. tests/integration/test_erasure.py runs the stage.

    pytest tests/unit/data/test_erased.py
"""

from __future__ import annotations

import json

import pyarrow as pa

from raylab import config
from raylab.core import lineage
from raylab.data import records, stage
from raylab.data.sources import source_rules
from raylab.data.sources.rows import RAW_SCHEMA, raw_row

CFG = config.load_dict({"version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": "/tmp/unused",
                        "data": {"sources": [{"type": "jsonl", "path": "/tmp/unused", "name": "docs"}]}})
RULES = {"docs": source_rules(CFG.data.sources[0], CFG.data)}


def batch() -> pa.Table:
    rows = [raw_row("docs", f"a.jsonl:{i}", json.dumps({"text": t}), json.dumps({"text": t}))
            for i, t in enumerate(["Alice Example asked for a refund.", "The blue widget ships today.",
                                   "Bob wrote a long note about widgets."], start=1)]
    rows.append(raw_row("docs", "a.jsonl:4", "{oops", error="invalid_json", message="bad"))
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def erase(*pairs) -> lineage.Suppression:
    return lineage.Suppression(scoped=frozenset(pairs), digest="x")


def test_an_erased_record_keeps_only_its_id_and_is_neither_accepted_nor_quarantined():
    checked = stage.check_batch(batch(), RULES, erase(("docs", "a.jsonl:1"), ("docs", "a.jsonl:4")))
    rows = {r["record_id"]: r for r in checked.to_pylist()}
    assert rows["a.jsonl:1"]["reason"] == stage.ERASED == "erased"
    assert not any(v for k, v in rows["a.jsonl:1"].items() if k not in ("source", "record_id", "reason"))
    assert "Alice" not in json.dumps(checked.to_pylist())  # its content is gone from the batch
    accepted = stage._where(checked, True, ["record_id"])["record_id"].to_pylist()
    quarantined = stage._where(checked, False, ["record_id"])["record_id"].to_pylist()
    assert accepted == ["a.jsonl:2", "a.jsonl:3"] and quarantined == []  # a broken erased record: not kept either


def test_negative_control_the_same_batch_without_the_suppression_accepts_and_quarantines_as_before():
    checked = stage.check_batch(batch(), RULES)
    assert stage._where(checked, True, ["record_id"])["record_id"].to_pylist() == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"]
    assert stage._where(checked, False, ["record_id"])["record_id"].to_pylist() == ["a.jsonl:4"]
    assert "Alice" in json.dumps(checked.to_pylist())
    # same source, other id; same id, other source: not suppressed
    other = stage.check_batch(batch(), RULES, erase(("docs", "a.jsonl:9"), ("kb", "a.jsonl:1")))
    assert stage.ERASED not in other["reason"].to_pylist()


def test_the_suppression_list_is_part_of_the_cache_key():
    inputs = [{"type": "jsonl", "files": [{"sha256": "f1"}]}]
    empty, one = lineage.Suppression(digest="d0"), lineage.Suppression(everywhere=frozenset({"a"}), digest="d1")
    assert stage._cache_key("c", inputs, empty) == stage._cache_key("c", inputs, lineage.Suppression(digest="d0"))
    assert stage._cache_key("c", inputs, empty) != stage._cache_key("c", inputs, one)
    assert stage._cache_key("c", [{"type": "sql", "files": []}], one) is None  # never cached anyway


def test_check_row_is_what_runs_for_records_not_on_the_list():
    row = batch().to_pylist()[1]
    direct = records.check_row(row, RULES["docs"], RULES["docs"].compiled(), RULES["docs"].detectors())
    via_batch = stage.check_batch(batch(), RULES, erase(("docs", "a.jsonl:1"))).to_pylist()[1]
    assert via_batch == direct
