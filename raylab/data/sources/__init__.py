"""The data stage's sources: files, SQL and HTTP, each read as a Ray Dataset of raw records
(`rows.RAW_SCHEMA`), never failing on a record.

    inputs = describe_inputs(cfg.data)          # every source reachable? exit 2 naming it
    ds = read_source(0, cfg.data.sources[0], cfg.data)
"""

from __future__ import annotations

from typing import Any

from raylab.config import DataConfig, Fields
from raylab.core import storage
from raylab.core.secrets import env_values, expand_env, redact_url, scrub, url_secrets
from raylab.data.records import SourceRules
from raylab.data.sources import sql
from raylab.data.sources.files import FILE_DATASOURCES, is_glob, listing
from raylab.data.sources.http import HttpDatasource
from raylab.data.sources.rows import RAW_SCHEMA, SourceError
from raylab.errors import UserError

__all__ = ["FILE_DATASOURCES", "RAW_SCHEMA", "SourceError", "describe_inputs", "http_datasource", "read_source",
           "source_name", "source_rules"]


def source_name(index: int, src) -> str:
    return src.name or f"source{index}"


def source_rules(src, data: DataConfig) -> SourceRules:
    """The format, field names and rules a source's records are checked with."""
    if src.type == "text":  # a document per file: always completion text
        return SourceRules("completion", Fields(), data.validation, data.clean, data.pii)
    return SourceRules(src.format or data.format, src.fields or data.fields, data.validation, data.clean, data.pii)


def describe_inputs(data: DataConfig) -> list[dict[str, Any]]:
    """Check every source is reachable (exit 2 naming it otherwise) and describe it."""
    out = []
    for i, src in enumerate(data.sources):
        name = source_name(i, src)
        key = f"data.sources.{i}"
        entry: dict[str, Any] = {"name": name, "type": src.type}
        if src.type in FILE_DATASOURCES:
            files = listing(src)
            if not files:
                raise UserError(f"{key} ({name}): no {src.type} files at {src.path}")
            entry["location"] = src.path
            entry["files"] = [{"path": p, "sha256": storage.sha256(p)} for p in files]
        elif src.type == "sql":
            url = expand_env(src.url, f"{key}.url")
            entry.update(location=redact_url(src.url), query=src.query)
            try:
                sql.check(url, src.query)
            except Exception as e:  # any driver's connection error is the user's to fix
                cause = scrub(" ".join(str(e).split()), url_secrets(url) + env_values(src.url))
                raise UserError(f"{key} ({name}): cannot query {redact_url(src.url)}: {cause}") from None
        else:
            entry.update(location=redact_url(src.url))
        out.append(entry)
    return out


# An HTTP source (pages in order) and an unsharded SQL query are one read task each. Left to
# itself Ray Data then asks for its default parallelism (200 on a small machine) and splits
# that one task's output into as many blocks: 120 records became 120 one-row blocks, every
# later operator ran 120 tasks, and the data stage took 3x as long as for the same records
# in a JSONL file. The blocks that come out are the task's own (a page, a cursor batch).
ONE_READ_TASK = 1


def read_source(index: int, src, data: DataConfig):
    """One source as a Ray Dataset of raw records (RAW_SCHEMA)."""
    import ray

    name, cpus = source_name(index, src), data.cpus_per_task
    if src.type in FILE_DATASOURCES:
        paths = src.path
        if is_glob(src.path):  # Ray's file datasources take files and directories, not patterns
            paths = listing(src)
            if not paths:
                raise UserError(f"data.sources.{index}.path ({name}): {src.path!r} matches no {src.type} file; fix the "
                                "pattern or the directory it names")
        ds = FILE_DATASOURCES[src.type](paths, source=name, root=src.path)
        return ray.data.read_datasource(ds, num_cpus=cpus)
    if src.type == "sql":
        url = expand_env(src.url, f"data.sources.{index}.url")
        rules = source_rules(src, data)
        # One block asked for (see ONE_READ_TASK): the rows still arrive as the cursor's
        # batches, split by Ray Data's target block size.
        return ray.data.read_sql(src.query, sql.Connect(url, name, redact_url(src.url)), num_cpus=cpus,
                                 override_num_blocks=ONE_READ_TASK).map_batches(
            sql.sql_rows_to_raw, batch_format="pyarrow", num_cpus=cpus,
            fn_kwargs={"source": name, "id_field": rules.fields.id},
        )
    return ray.data.read_datasource(http_datasource(index, src), num_cpus=cpus, override_num_blocks=ONE_READ_TASK)


def http_datasource(index: int, src) -> HttpDatasource:
    """An HTTP source's datasource. The URL and headers may hold ${env:NAME} secrets: they are
    expanded here, for the requests only; messages show the URL as configured, redacted."""
    url = expand_env(src.url, f"data.sources.{index}.url")
    headers = {k: expand_env(v, f"data.sources.{index}.headers.{k}") for k, v in src.headers.items()}
    spec = src.model_dump(include={"records_path", "page_param", "start_page", "cursor_param", "next_cursor_path",
                                   "max_pages", "retries", "backoff_s", "timeout_s", "max_retry_wait_s"}) | {"url": url}
    secrets = url_secrets(url) + env_values(src.url) + [v for h in src.headers.values() for v in env_values(h)]
    return HttpDatasource(spec, source_name(index, src), headers, src.url, secrets)
