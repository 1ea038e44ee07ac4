"""What the data stage counts: records per source and reason, PII redactions, tokens, packing.

Each function over a batch returns a small table; the driver sums them, so the counts come
from the same pass that writes the outputs and always add up (read = accepted + rejected +
duplicates + erased, per source and in total; erased: on the suppression list, `raylab erase`).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylab.data.packing import IGNORE

HIST_EDGES = [2 ** k for k in range(3, 17)]  # document-length histogram bin edges (tokens)
ERASED = "erased"  # the check stage's reason for a suppressed record: counted, never quarantined


def token_stats(batch: pa.Table) -> pa.Table:
    """Per batch: documents, tokens, target tokens and a length histogram, per split."""
    out = []
    for split in ("train", "val"):
        part = batch.filter(pc.equal(batch["split"], split))
        lengths = np.array(part["num_tokens"].to_pylist(), dtype=np.int64)
        targets = sum(sum(1 for x in labels[1:] if x != IGNORE) for labels in part["labels"].to_pylist())
        hist = np.histogram(lengths, bins=[0, *HIST_EDGES, np.iinfo(np.int64).max])[0] if len(lengths) else np.zeros(len(HIST_EDGES) + 1)
        out.append({"split": split, "documents": len(lengths), "tokens": int(lengths.sum()),
                    "target_tokens": targets, "hist": [int(h) for h in hist]})
    return pa.Table.from_pylist(out)


def packed_stats(batch: pa.Table) -> pa.Table:
    return pa.table({"sequences": [batch.num_rows], "real_tokens": [int(pc.sum(batch["num_tokens"]).as_py() or 0)]})


def pii_batch(batch: pa.Table) -> pa.Table:
    totals: dict[str, int] = {}
    for value in batch["pii"].to_pylist():
        for kind, n in (json.loads(value) if value else {}).items():
            totals[kind] = totals.get(kind, 0) + n
    return pa.table({"kind": list(totals), "n": list(totals.values())})


def count_batch(batch: pa.Table) -> pa.Table:
    """Per-batch (source, reason, n): the driver sums these small tables."""
    grouped = batch.group_by(["source", "reason"]).aggregate([("record_id", "count")])
    return grouped.rename_columns(["source", "reason", "n"])


def counts(checked, tokenized, drops: dict[str, str], names: list[str]) -> dict:
    """read = accepted + rejected + duplicates + erased, per source and in total."""
    by_source = {n: {"read": 0, "accepted": 0, "rejected": 0, "duplicates": 0, "erased": 0} for n in names}
    by_reason: dict[str, int] = {}
    for stage, ds in (("check", checked), ("tokenize", tokenized)):
        for g in ds.map_batches(count_batch, batch_format="pyarrow").take_all():
            n, src, reason = g["n"], g["source"], g["reason"]
            if stage == "check":
                by_source[src]["read"] += n
            if reason == ERASED:
                by_source[src]["erased"] += n
            elif reason:
                by_source[src]["rejected"] += n
                by_reason[reason] = by_reason.get(reason, 0) + n
            elif stage == "tokenize":
                by_source[src]["accepted"] += n
    dup = duplicate_counts(drops)
    for c in by_source.values():
        c["duplicates"] = c["read"] - c["accepted"] - c["rejected"] - c["erased"]
    read = sum(s["read"] for s in by_source.values())
    rejected = sum(by_reason.values())
    erased = sum(s["erased"] for s in by_source.values())
    return {
        "read": read, "accepted": read - rejected - len(drops) - erased, "rejected": rejected,
        "rejected_fraction": rejected / read if read else 0.0,
        "rejected_by_reason": by_reason, "duplicates": dup, "erased": erased, "by_source": by_source,
    }


def duplicate_counts(drops: dict[str, str]) -> dict[str, int]:
    """{exact, near}: how many records dedup dropped, by kind."""
    dup = {"exact": 0, "near": 0}
    for why in drops.values():
        dup[why.removeprefix("duplicate_")] += 1
    return dup


def token_summary(good, packed: dict[str, dict], seq_len: int) -> dict:
    rows = good.map_batches(token_stats, batch_format="pyarrow").take_all()
    out = {}
    for split in ("train", "val"):
        mine = [r for r in rows if r["split"] == split]
        hist = np.sum([r["hist"] for r in mine], axis=0).tolist() if mine else [0] * (len(HIST_EDGES) + 1)
        p = packed[split]
        out[split] = {
            "documents": sum(r["documents"] for r in mine),
            "tokens": sum(r["tokens"] for r in mine),
            "target_tokens": sum(r["target_tokens"] for r in mine),
            "sequences": p["sequences"],
            "packing_efficiency": p["real_tokens"] / (p["sequences"] * seq_len) if p["sequences"] else 0.0,
        }
        out[split]["length_histogram"] = {"edges": [0, *HIST_EDGES], "counts": [int(h) for h in hist]}
    out["max_seq_len"] = seq_len
    return out


def pii_totals(checked) -> dict[str, int]:
    """Redactions by PII type over the checked records."""
    out: dict[str, int] = {}
    for r in checked.map_batches(pii_batch, batch_format="pyarrow").take_all():
        out[r["kind"]] = out.get(r["kind"], 0) + r["n"]
    return out
