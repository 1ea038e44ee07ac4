"""A complete data manifest (raylab.core.runs.DataManifest) for tests that need one without
running the data stage: the train preflight and the CLI's exit-2 paths read it; `manifest_for`,
one over real source files with counts that add up, and `card_cfg`, a config with a
governance.card, for the model card and datasheet tests."""

from __future__ import annotations

import json
from pathlib import Path

from raylab import config
from raylab.core import runs, storage


def fake_manifest(tokenizer: dict | None = None, seq_len: int = 16, rows: int = 1, val_rows: int = 1) -> dict:
    """A manifest as the data stage writes it. `tokenizer` is a models.fingerprint(tok)."""

    def split(sequences: int) -> dict:
        return {"documents": 2, "tokens": 10, "target_tokens": 8, "sequences": sequences, "packing_efficiency": 0.5,
                "length_histogram": {"edges": [0, 8], "counts": [0, 2, 0]}}

    raw = {"version": 1, "created": "2026-12-01T00:00:00+00:00", "config_hash": "c", "cache_key": None,
           "tokenizer": tokenizer or {"fingerprint": "f"}, "inputs": [], "by_source": {}, "pii_redactions": {},
           "counts": {"read": 3, "accepted": 2, "rejected": 1, "rejected_fraction": 1 / 3, "rejected_by_reason": {},
                      "duplicates": {"exact": 0, "near": 0}},
           "tokens": {"train": split(rows), "val": split(val_rows), "max_seq_len": seq_len},
           "outputs": {"train": "t", "val": "v"}}
    runs.DataManifest.model_validate(raw)  # stays in step with the schema
    return raw


def manifest_for(tmp_path: Path) -> dict:
    """A data manifest whose counts add up (read = accepted + rejected + duplicates + erased)
    over two real source files, hashed as the data stage hashes them."""
    faq, chats = tmp_path / "faq.csv", tmp_path / "chats.jsonl"
    faq.write_text("question,answer\nWhere is my order?,It ships today.\n")
    chats.write_text(json.dumps({"messages": []}) + "\n")
    split = {"documents": 7, "tokens": 350, "target_tokens": 120, "sequences": 4, "packing_efficiency": 0.6,
             "length_histogram": {"edges": [0, 8], "counts": [0, 7, 0]}}
    raw = {"version": 1, "created": "2026-12-01T00:00:00+00:00", "config_hash": "c", "cache_key": "k",
           "tokenizer": {"fingerprint": "tok123"},
           "inputs": [{"name": "faq", "type": "csv", "location": str(faq), "records_read": 6,
                       "files": [{"path": str(faq), "sha256": storage.sha256(str(faq))}]},
                      {"name": "support", "type": "jsonl", "location": str(chats), "records_read": 6,
                       "files": [{"path": str(chats), "sha256": storage.sha256(str(chats))}]}],
           "by_source": {"faq": {"read": 6, "accepted": 5, "rejected": 1, "duplicates": 0, "erased": 0},
                         "support": {"read": 6, "accepted": 3, "rejected": 0, "duplicates": 2, "erased": 1}},
           "counts": {"read": 12, "accepted": 8, "rejected": 1, "rejected_fraction": 1 / 12,
                      "rejected_by_reason": {"too_short": 1}, "duplicates": {"exact": 1, "near": 1}, "erased": 1},
           "pii_redactions": {"EMAIL": 3, "PERSON": 2},
           "tokens": {"train": split, "val": split | {"documents": 1, "tokens": 50, "sequences": 1}, "max_seq_len": 64},
           "outputs": {"train": "t", "val": "v"}}
    return raw


def card_cfg(tmp_path: Path, **card) -> config.RaylabConfig:
    return config.load_dict({
        "version": 1, "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
        "model": {"name_or_path": "preset:tiny-llama"}, "train": {"seed": 7, "lr": 0.002},
        "registry": {"model_name": "widgets"},
        "governance": {"card": {"intended_use": "Answer widget questions.", "out_of_scope_use": "Medical advice.",
                                "contact": "ml@acme.example", **card}},
    })
