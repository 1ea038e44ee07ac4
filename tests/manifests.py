"""A complete data manifest (raylab.core.runs.DataManifest) for tests that need one without
running the data stage: the train preflight and the CLI's exit-2 paths read it."""

from __future__ import annotations

from raylab.core import runs


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
