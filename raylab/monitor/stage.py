"""`raylab monitor CONFIG`: has what the endpoint serves drifted from what it was trained on?

    raylab monitor configs/quickstart.yaml            # a score per statistic and overall; exit 1 above the threshold
    raylab monitor configs/quickstart.yaml --json     # the same report as JSON (for a scheduler or an alert)

Reads the served-prompt sample the Ingress replicas wrote under <output_dir>/serve/prompts/
(raylab/serve/sample.py; redacted, written through core/storage) and the data stage's
accepted train-split records (data/records/: already redacted by the same detectors), and
scores them with drift.py: length and token distributions, and the embedding distance
with the retrieval embedder when `serve.rag` attaches an index. Run it on a schedule (cron,
the CI's schedule trigger): it exits 1 when the overall score (the largest statistic) is
above `serve.monitor.drift_threshold`, 2 when there is not enough to compare.
"""

from __future__ import annotations

import json

from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.monitor import drift

# Training texts embedded at most (evenly spaced): embedding is the slow statistic, and the
# centroid of a few thousand texts is already stable.
EMBED_LIMIT = 2000
STATISTICS = ("length", "tokens", "embedding")


def served_prompts(cfg) -> list[str]:
    """Every Ingress replica's sampled prompts (serve/prompts/*.jsonl, lines of {"prompt"})."""
    out = []
    for location in storage.list_files(runs.Run(cfg.output_dir).served_prompts, ".jsonl"):
        out += [json.loads(line)["prompt"] for line in storage.read_text(location).splitlines() if line.strip()]
    return out


def record_prompt(row: dict) -> str:
    """The part of a training record a served prompt corresponds to: a chat's user messages,
    a completion record's text."""
    if row.get("messages"):
        return "\n".join(m["content"] for m in json.loads(row["messages"])
                         if m.get("role") == "user" and isinstance(m.get("content"), str))
    return row.get("text") or ""


def evenly(items: list, limit: int) -> list:
    """At most `limit` of `items`, evenly spaced (the same ones on every run)."""
    if len(items) <= limit:
        return items
    return [items[(i * len(items)) // limit] for i in range(limit)]


def training_prompts(cfg) -> list[str]:
    run = runs.Run(cfg.output_dir)
    location = run.split("records")
    if not storage.parquet_files(location):
        raise UserError(f"output_dir: no data-stage records under {location} to compare the served prompts with; "
                        "run `raylab data` for this config first")
    rows = storage.read_table(location, columns=["record_id", "text", "messages", "split"]).to_pylist()
    rows = sorted((r for r in rows if r["split"] == "train"), key=lambda r: str(r["record_id"]))
    texts = [t for t in (record_prompt(r) for r in rows) if t.strip()]
    return evenly(texts, cfg.serve.monitor.max_training_records)


def _index_dir(cfg) -> str | None:
    if cfg.serve.rag is None:
        return None
    from raylab import rag

    return cfg.serve.rag.index or rag.index_directory(cfg)


def run_monitor(cfg, embed=None) -> dict:
    """The drift report: {"prompts", "training_records", "statistics": {name: score},
    "overall", "threshold", "drifted"}. `embed(texts) -> vectors` overrides the retrieval
    embedder (None: the index's, when serve.rag is set; otherwise no embedding statistic)."""
    m = cfg.serve.monitor
    served = served_prompts(cfg)
    where = runs.Run(cfg.output_dir).served_prompts
    if len(served) < m.min_prompts:
        raise UserError(f"serve.monitor.min_prompts: {len(served)} served prompts sampled under {where}, fewer "
                        f"than {m.min_prompts}; serve more traffic (with serve.monitor.sample_prompts > 0) or lower "
                        "serve.monitor.min_prompts")
    training = training_prompts(cfg)
    stats = {"length": drift.length_drift(training, served),
             "tokens": drift.token_drift(training, served, m.vocabulary)}
    index_dir = _index_dir(cfg) if embed is None else None
    if embed is None and index_dir is not None:
        from raylab import rag

        if not storage.exists(runs.index_manifest(index_dir)):
            raise UserError(f"serve.rag.index: no index at {index_dir} to embed with; run `raylab index` first")
        embed = rag.Index(index_dir).embed
    if embed is not None:
        stats["embedding"] = drift.embedding_drift(embed(evenly(training, EMBED_LIMIT)), embed(served))
    overall = max(stats.values())
    return {"prompts": len(served), "training_records": len(training),
            "statistics": {k: round(v, 4) for k, v in stats.items()}, "overall": round(overall, 4),
            "threshold": m.drift_threshold, "drifted": overall > m.drift_threshold}


def summary(report: dict) -> str:
    """The report as a few lines: a score per statistic, the overall one, the verdict."""
    lines = [f"drift of {report['prompts']} served prompts from {report['training_records']} training records "
             "(Jensen-Shannon divergence; embedding: cosine distance of the centroids / 2)"]
    lines += [f"  {name:<10} {score:.4f}" for name, score in report["statistics"].items()]
    verdict = "DRIFTED: above" if report["drifted"] else "ok: at most"
    lines.append(f"  {'overall':<10} {report['overall']:.4f}   {verdict} serve.monitor.drift_threshold "
                 f"{report['threshold']}")
    return "\n".join(lines)
