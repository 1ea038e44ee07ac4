"""The data stage: sources -> parsed, normalised, validated records + quarantine + manifest.

    raylab data configs/quickstart.yaml          # CLI
    raylab.data.run_data(cfg)                    # Python; returns the manifest

What it does, on Ray Data: read every source (raylab/sources.py) into one dataset of raw
records; normalise each to its format, clean it, check the validation rules and redact PII
(raylab/records.py, raylab/pii.py); drop exact and near duplicates across the whole dataset
(raylab/dedup.py); tokenize in an actor pool, split train/val by record id, and pack
(raylab/packing.py, which documents the trainer contract); write zstd Parquet and
`manifest.json`. No record stops the job: a broken one is quarantined with a reason code.
A source that cannot be read at all, or a rejected fraction above
`data.validation.max_rejected_fraction`, fails the stage with exit 2 (after the quarantine
and manifest are written, so nothing is lost).

Outputs under `<output_dir>/data/`:
    train/, val/*.parquet  packed sequences (raylab/packing.py: input_ids, labels,
                           position_ids, segment_ids, num_tokens)
    records/*.parquet      the accepted documents, redacted: source, record_id, format, text,
                           messages (JSON), split, num_tokens (for evaluation and inspection)
    quarantine/*.parquet   rejected: source, record_id, reason, message, raw -- SENSITIVE:
                           it holds records exactly as read, personal data included
    manifest.json          inputs (files with sha256), config hash, tokenizer fingerprint,
                           counts (always read = accepted + rejected + duplicates), PII
                           redactions by type, tokens, packing efficiency, length histogram

Re-running with unchanged file inputs and data config is a cache hit (nothing is re-read);
SQL and HTTP inputs cannot be fingerprinted without reading them, so they always rebuild.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import logging
import os
import sqlite3
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylab import cluster, config, dedup, packing, records, sources, storage
from raylab.config import Fields, RaylabConfig
from raylab.errors import UserError

MANIFEST_VERSION = 1
CHECKED_SCHEMA = pa.schema([(n, pa.string()) for n in
                            ("source", "record_id", "raw", "format", "text", "messages", "reason", "message", "pii")])
DOC_COLUMNS = ["source", "record_id", "raw", "format", "text", "messages"]
RECORD_COLUMNS = ["source", "record_id", "format", "text", "messages", "split", "num_tokens"]
QUARANTINE_COLUMNS = ["source", "record_id", "reason", "message", "raw"]
TOKENIZE_BLOCK_ROWS = 2048
HIST_EDGES = [2 ** k for k in range(3, 17)]  # document-length histogram bin edges (tokens)


def source_name(index: int, src) -> str:
    return src.name or f"source{index}"


def source_rules(src, cfg: RaylabConfig) -> records.SourceRules:
    d = cfg.data
    if src.type == "text":  # a document per file: always completion text
        return records.SourceRules("completion", Fields(), d.validation, d.clean, d.pii)
    return records.SourceRules(src.format or d.format, src.fields or d.fields, d.validation, d.clean, d.pii)


# ---------------------------------------------------------------- inputs


def _listing(src) -> list[str]:
    """The files a file source covers (local paths; URIs are listed by pyarrow)."""
    from pyarrow import fs

    exts = sources.FILE_DATASOURCES[src.type]._FILE_EXTENSIONS
    if "://" in src.path:
        filesystem, root = storage.resolve(src.path)
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.File:
            return [src.path]
        if info.type == fs.FileType.NotFound:
            return []
        scheme = src.path.split("://", 1)[0]
        found = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        paths = [f"{scheme}://{f.path}" for f in found if f.type == fs.FileType.File]
    elif os.path.isdir(src.path):
        paths = [os.path.join(d, f) for d, _, files in os.walk(src.path) for f in files]
    else:
        paths = glob.glob(src.path) if any(c in src.path for c in "*?[") else ([src.path] if os.path.exists(src.path) else [])
    if exts:
        paths = [p for p in paths if p.rsplit(".", 1)[-1].lower() in exts]
    return sorted(p for p in paths if not os.path.basename(p).startswith("."))


def _sqlite_path(url: str) -> str | None:
    return os.path.abspath(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


class Connect:
    """A picklable DB-API connection factory for ray.data.read_sql."""

    def __init__(self, url: str):
        self.url = url

    def __call__(self):
        path = _sqlite_path(self.url)
        if path is not None:  # read-only: never create an empty database by accident
            return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        import psycopg2  # the `postgres` extra

        return psycopg2.connect(self.url)


def describe_inputs(cfg: RaylabConfig) -> list[dict[str, Any]]:
    """Check every source is reachable (exit 2 naming it otherwise) and describe it."""
    out = []
    for i, src in enumerate(cfg.data.sources):
        name = source_name(i, src)
        key = f"data.sources.{i}"
        entry: dict[str, Any] = {"name": name, "type": src.type}
        if src.type in sources.FILE_DATASOURCES:
            files = _listing(src)
            if not files:
                raise UserError(f"{key} ({name}): no {src.type} files at {src.path}")
            entry["location"] = src.path
            entry["files"] = [{"path": p, "sha256": storage.sha256(p)} for p in files]
        elif src.type == "sql":
            url = config.expand_env(src.url, f"{key}.url")
            entry.update(location=_redact_url(src.url), query=src.query)
            try:
                path = _sqlite_path(url)
                if path is not None and not os.path.isfile(path):
                    raise OSError(f"no SQLite database at {path}")
                conn = Connect(url)()
                try:  # the query parses and its tables exist; LIMIT 0 reads nothing
                    conn.cursor().execute(f"SELECT * FROM ({src.query}) AS raylab_check LIMIT 0")
                finally:
                    conn.close()
            except Exception as e:  # any driver's connection error is the user's to fix
                raise UserError(f"{key} ({name}): cannot query {_redact_url(src.url)}: {e}") from None
        else:
            entry.update(location=src.url)
        out.append(entry)
    return out


def _redact_url(url: str) -> str:
    """Keep ${env:...} references; drop a password written inline."""
    if "${env:" in url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


# ---------------------------------------------------------------- reading and checking


def read_source(index: int, src, cfg: RaylabConfig):
    """One source as a Ray Dataset of raw records (sources.RAW_SCHEMA)."""
    import ray

    name, cpus = source_name(index, src), cfg.data.cpus_per_task
    if src.type in sources.FILE_DATASOURCES:
        ds = sources.FILE_DATASOURCES[src.type](src.path, source=name)
        return ray.data.read_datasource(ds, num_cpus=cpus)
    if src.type == "sql":
        url = config.expand_env(src.url, f"data.sources.{index}.url")
        rules = source_rules(src, cfg)
        return ray.data.read_sql(src.query, Connect(url), num_cpus=cpus).map_batches(
            sources.sql_rows_to_raw, batch_format="pyarrow", num_cpus=cpus,
            fn_kwargs={"source": name, "id_field": rules.fields.id},
        )
    headers = {k: config.expand_env(v, f"data.sources.{index}.headers.{k}") for k, v in src.headers.items()}
    spec = src.model_dump(include={"url", "records_path", "page_param", "start_page", "cursor_param",
                                   "next_cursor_path", "max_pages", "retries", "backoff_s", "timeout_s"})
    return ray.data.read_datasource(sources.HttpDatasource(spec, name, headers), num_cpus=cpus)


def check_batch(batch: pa.Table, rules: dict[str, records.SourceRules]) -> pa.Table:
    compiled = {name: (r.compiled(), r.detectors()) for name, r in rules.items()}
    rows = [records.check_row(row, rules[row["source"]], *compiled[row["source"]]) for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=CHECKED_SCHEMA)


def tokenize(docs, cfg: RaylabConfig):
    """Documents (DOC_COLUMNS) -> token ids and labels, in an actor pool that loads the
    tokenizer once per actor (packing.Tokenize)."""
    import ray

    d = cfg.data
    # Small corpora can arrive as one block, which one actor would tokenize alone: bound
    # the rows per block (a streaming repartition) so every actor gets work.
    return docs.repartition(target_num_rows_per_block=TOKENIZE_BLOCK_ROWS).map_batches(
        packing.Tokenize, batch_format="pyarrow", batch_size=256, num_cpus=d.cpus_per_task,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=d.tokenizer_actors),
        fn_constructor_kwargs={
            "model_cfg": cfg.model.model_dump(), "max_tokens": d.validation.max_tokens or d.max_seq_len,
            "over": d.validation.over_max_tokens, "train_on_prompt": d.train_on_prompt,
        },
    )


def pack(tokenized, cfg: RaylabConfig, pad_id: int):
    """Tokenized documents -> fixed-length training rows (packing.pack_batch's contract)."""
    d = cfg.data
    return tokenized.map_batches(
        packing.pack_batch, batch_format="pyarrow", batch_size=1024, num_cpus=d.cpus_per_task,
        fn_kwargs={"seq_len": d.max_seq_len, "pad_id": pad_id, "mode": d.packing},
    )


def _where(batch: pa.Table, accepted: bool, columns: list[str]) -> pa.Table:
    mask = pc.equal(batch["reason"], "")
    return batch.filter(mask if accepted else pc.invert(mask)).select(columns)


def _without(batch: pa.Table, drops: frozenset[str]) -> pa.Table:
    keep = [rid not in drops for rid in batch["record_id"].to_pylist()]
    return batch.filter(pa.array(keep, type=pa.bool_()))


def _with_split(batch: pa.Table, seed: int, fraction: float) -> pa.Table:
    split = ["val" if packing.in_val(r, seed, fraction) else "train" for r in batch["record_id"].to_pylist()]
    lengths = pc.list_value_length(batch["input_ids"]).cast(pa.int32())
    return batch.append_column("split", pa.array(split)).append_column("num_tokens", lengths)


def _of_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch["split"], split))


def token_stats(batch: pa.Table) -> pa.Table:
    """Per batch: documents, tokens, target tokens and a length histogram, per split."""
    out = []
    for split in ("train", "val"):
        part = batch.filter(pc.equal(batch["split"], split))
        lengths = np.array(part["num_tokens"].to_pylist(), dtype=np.int64)
        targets = sum(sum(1 for x in labels[1:] if x != packing.IGNORE) for labels in part["labels"].to_pylist())
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


# ---------------------------------------------------------------- the stage


def _config_hash(cfg: RaylabConfig) -> str:
    """The data section plus the model section (the tokenizer decides the tokens)."""
    material = cfg.data.model_dump_json() + cfg.model.model_dump_json()
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _cached(manifest_path: str, key: str) -> dict | None:
    if not storage.exists(manifest_path):
        return None
    try:
        manifest = json.loads(storage.read_text(manifest_path))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("cache_key") == key and manifest.get("version") == MANIFEST_VERSION else None


def _cache_key(cfg: RaylabConfig, inputs: list[dict]) -> str | None:
    if any(i["type"] in ("sql", "http") for i in inputs):
        return None
    material = json.dumps([_config_hash(cfg), [[f["sha256"] for f in i["files"]] for i in inputs]])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _unwrap_source_error(e: BaseException) -> sources.SourceError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, sources.SourceError):
            return e
        if "SourceError" in type(e).__name__ or "data source '" in str(e):
            return sources.SourceError(str(e).splitlines()[-1].split("SourceError: ")[-1])
        e = e.__cause__ or e.__context__
    return None


def run_data(cfg: RaylabConfig, address: str | None = None, log=print) -> dict:
    """Run the data stage; returns the manifest (also written to data/manifest.json)."""
    out = storage.join(cfg.output_dir, "data")
    manifest_path = storage.join(out, "manifest.json")
    inputs = describe_inputs(cfg)
    key = _cache_key(cfg, inputs)
    if key and (hit := _cached(manifest_path, key)):
        log(f"data: cache hit ({manifest_path}); inputs and data config unchanged")
        hit["cache"] = {"hit": True}
        return hit

    from raylab.model import fingerprint, load_tokenizer

    tok = load_tokenizer(cfg.model)  # fails early on a bad model; materialises a preset once
    cluster.prepare(cfg, address)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    config.write_resolved(cfg)
    rules = {source_name(i, s): source_rules(s, cfg) for i, s in enumerate(cfg.data.sources)}
    cpus = cfg.data.cpus_per_task
    try:
        parts = [read_source(i, s, cfg) for i, s in enumerate(cfg.data.sources)]
        raw = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        # Materialised once: both outputs and the counts come from one pass over the
        # sources (Ray spills to disk beyond the object store, so memory stays bounded).
        checked = raw.map_batches(check_batch, batch_format="pyarrow", num_cpus=cpus,
                                  fn_kwargs={"rules": rules}).materialize()
    except Exception as e:
        source_error = _unwrap_source_error(e)
        if source_error is not None:
            raise UserError(str(source_error)) from None
        raise
    d = cfg.data
    accepted = checked.map_batches(_where, batch_format="pyarrow", num_cpus=cpus,
                                   fn_kwargs={"accepted": True, "columns": DOC_COLUMNS}).materialize()
    drops = dedup.find_duplicates(accepted, d.dedup, cpus)
    kept = accepted.map_batches(_without, batch_format="pyarrow", num_cpus=cpus, fn_kwargs={"drops": frozenset(drops)})
    tokenized = tokenize(kept, cfg).materialize()
    good = tokenized.map_batches(_where, batch_format="pyarrow", num_cpus=cpus,
                                 fn_kwargs={"accepted": True, "columns": [*DOC_COLUMNS, "input_ids", "labels"]}
                                 ).map_batches(_with_split, batch_format="pyarrow", num_cpus=cpus,
                                               fn_kwargs={"seed": d.seed, "fraction": d.val_fraction}).materialize()

    outputs = {name: storage.join(out, name) for name in ("train", "val", "records", "quarantine")}
    for location in outputs.values():
        storage.reset_dir(location)
    rejects = [ds.map_batches(_where, batch_format="pyarrow", num_cpus=cpus,
                              fn_kwargs={"accepted": False, "columns": QUARANTINE_COLUMNS}) for ds in (checked, tokenized)]
    rejects[0].union(rejects[1]).write_parquet(outputs["quarantine"], compression="zstd")
    good.select_columns(RECORD_COLUMNS).write_parquet(outputs["records"], compression="zstd")
    packed_stats_by_split = {}
    for split in ("train", "val"):
        part = good.map_batches(_of_split, batch_format="pyarrow", fn_kwargs={"split": split})
        packed = pack(part, cfg, tok.pad_token_id).materialize()
        packed.write_parquet(outputs[split], compression="zstd")
        rows = packed.map_batches(packed_stats, batch_format="pyarrow").take_all()
        packed_stats_by_split[split] = {"sequences": sum(r["sequences"] for r in rows),
                                        "real_tokens": sum(r["real_tokens"] for r in rows)}

    counts = _counts(checked, tokenized, drops, list(rules))
    tokens = _token_summary(good, packed_stats_by_split, d.max_seq_len)
    pii_counts: dict[str, int] = {}
    for r in checked.map_batches(pii_batch, batch_format="pyarrow").take_all():
        pii_counts[r["kind"]] = pii_counts.get(r["kind"], 0) + r["n"]
    manifest = {
        "version": MANIFEST_VERSION,
        "stage": "data",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": _config_hash(cfg),
        "cache_key": key,
        "tokenizer": fingerprint(tok),
        "inputs": [{**i, "records_read": counts["by_source"][i["name"]]["read"]} for i in inputs],
        "counts": {k: v for k, v in counts.items() if k != "by_source"},
        "by_source": counts["by_source"],
        "pii_redactions": pii_counts,
        "tokens": tokens,
        "outputs": outputs,
        "cache": {"hit": False},
    }
    storage.write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    c = manifest["counts"]
    log(f"data: read {c['read']}, accepted {c['accepted']}, rejected {c['rejected']} "
        f"({c['rejected_fraction']:.1%}), duplicates {c['duplicates']['exact']} exact + "
        f"{c['duplicates']['near']} near -> {out}")
    for reason, n in sorted(c["rejected_by_reason"].items()):
        log(f"  quarantined {n:>5} {reason}")
    for kind, n in sorted(pii_counts.items()):
        log(f"  redacted    {n:>5} {kind}")
    for split in ("train", "val"):
        t = tokens[split]
        log(f"  {split:<5} {t['documents']} documents, {t['tokens']} tokens ({t['target_tokens']} targets) in "
            f"{t['sequences']} x {d.max_seq_len} sequences, packing efficiency {t['packing_efficiency']:.1%}")
    limit = cfg.data.validation.max_rejected_fraction
    if limit is not None and c["rejected_fraction"] > limit:
        raise UserError(
            f"{c['rejected']} of {c['read']} records rejected ({c['rejected_fraction']:.1%}), above "
            f"data.validation.max_rejected_fraction={limit:g}; see {outputs['quarantine']} and {manifest_path}"
        )
    return manifest


def count_batch(batch: pa.Table) -> pa.Table:
    """Per-batch (source, reason, n): the driver sums these small tables."""
    grouped = batch.group_by(["source", "reason"]).aggregate([("record_id", "count")])
    return grouped.rename_columns(["source", "reason", "n"])


def _counts(checked, tokenized, drops: dict[str, str], names: list[str]) -> dict:
    """read = accepted + rejected + duplicates, per source and in total."""
    by_source = {n: {"read": 0, "accepted": 0, "rejected": 0, "duplicates": 0} for n in names}
    by_reason: dict[str, int] = {}
    for stage, ds in (("check", checked), ("tokenize", tokenized)):
        for g in ds.map_batches(count_batch, batch_format="pyarrow").take_all():
            n, src, reason = g["n"], g["source"], g["reason"]
            if stage == "check":
                by_source[src]["read"] += n
            if reason:
                by_source[src]["rejected"] += n
                by_reason[reason] = by_reason.get(reason, 0) + n
            elif stage == "tokenize":
                by_source[src]["accepted"] += n
    dup = {"exact": 0, "near": 0}
    for why in drops.values():
        dup[why.removeprefix("duplicate_")] += 1
    for counts in by_source.values():
        counts["duplicates"] = counts["read"] - counts["accepted"] - counts["rejected"]
    read = sum(s["read"] for s in by_source.values())
    rejected = sum(by_reason.values())
    return {
        "read": read, "accepted": read - rejected - len(drops), "rejected": rejected,
        "rejected_fraction": rejected / read if read else 0.0,
        "rejected_by_reason": by_reason, "duplicates": dup, "by_source": by_source,
    }


def _token_summary(good, packed: dict[str, dict], seq_len: int) -> dict:
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
