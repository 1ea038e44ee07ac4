"""The data stage: sources -> parsed, normalised, validated records + quarantine + manifest.

    raylab data configs/quickstart.yaml          # CLI
    raylab.data.run_data(cfg)                    # Python; returns the manifest

What it does, on Ray Data, streaming: read every source (raylab/sources.py) into one
dataset of raw records; normalise each to its format and check the validation rules
(raylab/records.py); write accepted records and the quarantine as zstd Parquet; write
`manifest.json`. No record stops the job: a broken one is quarantined with a reason code.
A source that cannot be read at all, or a rejected fraction above
`data.validation.max_rejected_fraction`, fails the stage with exit 2 (after the quarantine
and manifest are written, so nothing is lost).

Outputs under `<output_dir>/data/`:
    records/*.parquet      accepted: source, record_id, format, text, messages (JSON)
    quarantine/*.parquet   rejected: source, record_id, reason, message, raw -- SENSITIVE:
                           it holds records exactly as read, personal data included
    manifest.json          inputs (files with sha256), config hash, counts; always
                           read = accepted + rejected

Re-running with unchanged file inputs and data config is a cache hit (nothing is re-read);
SQL and HTTP inputs cannot be fingerprinted without reading them, so they always rebuild.
Not yet in this stage (next parts of the data issue): dedup, PII redaction, tokenization,
packing and the train/val split.
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

import pyarrow as pa
import pyarrow.compute as pc

from raylab import cluster, config, records, storage, sources
from raylab.config import Fields, RaylabConfig
from raylab.errors import UserError

MANIFEST_VERSION = 1
CHECKED_SCHEMA = pa.schema([(n, pa.string()) for n in
                            ("source", "record_id", "raw", "format", "text", "messages", "reason", "message")])
ACCEPTED_COLUMNS = ["source", "record_id", "format", "text", "messages"]
QUARANTINE_COLUMNS = ["source", "record_id", "reason", "message", "raw"]


def source_name(index: int, src) -> str:
    return src.name or f"source{index}"


def source_rules(src, cfg: RaylabConfig) -> records.SourceRules:
    d = cfg.data
    if src.type == "text":  # a document per file: always completion text
        return records.SourceRules("completion", Fields(), d.validation)
    return records.SourceRules(src.format or d.format, src.fields or d.fields, d.validation)


# ---------------------------------------------------------------- inputs


def _listing(src) -> list[str]:
    """The files a file source covers (local paths; URIs are listed by pyarrow)."""
    from pyarrow import fs

    exts = sources.FILE_DATASOURCES[src.type]._FILE_EXTENSIONS
    if "://" in src.path:
        filesystem, root = fs.FileSystem.from_uri(src.path)
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


def _sha256(location: str) -> str:
    from pyarrow import fs

    filesystem, path = (fs.LocalFileSystem(), location) if "://" not in location else fs.FileSystem.from_uri(location)
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
            entry["files"] = [{"path": p, "sha256": _sha256(p)} for p in files]
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
    compiled = {name: r.compiled() for name, r in rules.items()}
    rows = [records.check_row(row, rules[row["source"]], compiled[row["source"]]) for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=CHECKED_SCHEMA)


def _where(batch: pa.Table, accepted: bool, columns: list[str]) -> pa.Table:
    mask = pc.equal(batch["reason"], "")
    return batch.filter(mask if accepted else pc.invert(mask)).select(columns)


# ---------------------------------------------------------------- the stage


def _config_hash(cfg: RaylabConfig) -> str:
    return hashlib.sha256(cfg.data.model_dump_json().encode()).hexdigest()[:16]


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


def _clear(location: str) -> None:
    from pyarrow import fs

    filesystem, path = (fs.LocalFileSystem(), os.path.abspath(location)) if "://" not in location else fs.FileSystem.from_uri(location)
    if filesystem.get_file_info(path).type != fs.FileType.NotFound:
        filesystem.delete_dir(path)
    filesystem.create_dir(path, recursive=True)


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
    records_dir, quarantine_dir = storage.join(out, "records"), storage.join(out, "quarantine")
    for location, accepted, columns in ((records_dir, True, ACCEPTED_COLUMNS), (quarantine_dir, False, QUARANTINE_COLUMNS)):
        _clear(location)
        checked.map_batches(_where, batch_format="pyarrow", num_cpus=cpus,
                            fn_kwargs={"accepted": accepted, "columns": columns}
                            ).write_parquet(location, compression="zstd")
    counts = _counts(checked, list(rules))
    manifest = {
        "version": MANIFEST_VERSION,
        "stage": "data",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": _config_hash(cfg),
        "cache_key": key,
        "inputs": [{**i, "records_read": counts["by_source"][i["name"]]["read"]} for i in inputs],
        "counts": {k: v for k, v in counts.items() if k != "by_source"},
        "by_source": counts["by_source"],
        "outputs": {"records": records_dir, "quarantine": quarantine_dir},
        "cache": {"hit": False},
    }
    storage.write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    c = manifest["counts"]
    log(f"data: read {c['read']}, accepted {c['accepted']}, rejected {c['rejected']} "
        f"({c['rejected_fraction']:.1%}) -> {out}")
    for reason, n in sorted(c["rejected_by_reason"].items()):
        log(f"  quarantined {n:>5} {reason}")
    limit = cfg.data.validation.max_rejected_fraction
    if limit is not None and c["rejected_fraction"] > limit:
        raise UserError(
            f"{c['rejected']} of {c['read']} records rejected ({c['rejected_fraction']:.1%}), above "
            f"data.validation.max_rejected_fraction={limit:g}; see {quarantine_dir} and {manifest_path}"
        )
    return manifest


def count_batch(batch: pa.Table) -> pa.Table:
    """Per-batch (source, reason, n): the driver sums these small tables."""
    grouped = batch.group_by(["source", "reason"]).aggregate([("record_id", "count")])
    return grouped.rename_columns(["source", "reason", "n"])


def _counts(checked, names: list[str]) -> dict:
    groups = checked.map_batches(count_batch, batch_format="pyarrow").take_all()
    by_source = {n: {"read": 0, "accepted": 0, "rejected": 0} for n in names}
    by_reason: dict[str, int] = {}
    for g in groups:
        n, src, reason = g["n"], g["source"], g["reason"]
        by_source[src]["read"] += n
        if reason:
            by_source[src]["rejected"] += n
            by_reason[reason] = by_reason.get(reason, 0) + n
        else:
            by_source[src]["accepted"] += n
    read = sum(s["read"] for s in by_source.values())
    rejected = sum(by_reason.values())
    return {
        "read": read, "accepted": read - rejected, "rejected": rejected,
        "rejected_fraction": rejected / read if read else 0.0,
        "rejected_by_reason": by_reason, "by_source": by_source,
    }
