"""The data stage's checks without its training outputs: sources -> accepted, cleaned,
redacted, deduplicated documents, for stages that index text rather than train on it.

    docs, counts = clean_documents(cfg.data)             # on a connected Ray
    docs, counts = clean_documents(cfg.data, sources)    # another list of sources, same rules

Every record goes through exactly what `raylab data` does to it (records.check_row: parse,
normalise, clean, validate, redact PII; dedup.find_duplicates across the whole set); nothing
is tokenized, packed or written. Each document keeps its `origin`: where a reader finds it
again (a file path with the record's line or index, a redacted SQL URL with its key, an
HTTP URL with its page), so a retrieved chunk can cite it.
"""

from __future__ import annotations

import dataclasses
import json
import secrets

import pyarrow as pa

from raylab.config import DataConfig
from raylab.core import lineage
from raylab.core.secrets import redact_url
from raylab.data import dedup
from raylab.data.sources import FILE_DATASOURCES, source_name, source_rules
from raylab.data.sources.files import source_root
from raylab.data.stage import DOC_COLUMNS, _check_sources, _where, _without
from raylab.data.stats import ERASED, count_batch, duplicate_counts, pii_totals
from raylab.errors import UserError

DOCUMENT_COLUMNS = ["source", "record_id", "origin", "format", "text", "messages"]


def origin_of(src, record_id: str) -> str:
    """Where a record came from, in terms its owner recognises (no secrets)."""
    if src.type in FILE_DATASOURCES:
        scheme = src.path.split("://", 1)[0] + "://" if "://" in src.path else ""
        return f"{scheme}{source_root(src.path)}/{record_id}"
    return f"{redact_url(src.url)}#{record_id.removeprefix('sql:')}"


def _with_origin(batch: pa.Table, sources: dict) -> pa.Table:
    origins = [origin_of(sources[s], r) for s, r in zip(batch["source"].to_pylist(), batch["record_id"].to_pylist(),
                                                      strict=True)]
    return batch.append_column("origin", pa.array(origins, type=pa.string())).select(DOCUMENT_COLUMNS)


def clean_documents(data: DataConfig, sources: list | None = None) -> tuple:
    """(a materialised Ray Dataset of DOCUMENT_COLUMNS, counts) for `sources` (default
    data.sources) under data's rules. Ray must be connected (the caller's stage does that).
    A source that cannot be read is a UserError naming it, as in `raylab data`."""
    if sources is not None:
        if not sources:
            raise UserError("no sources to read: give at least one")
        data = data.model_copy(update={"sources": list(sources)})
    # one per call, as per data-stage run: equal values get equal pseudonyms, never written
    pseudonym_key = secrets.token_bytes(32) if data.pii.pseudonymize else None
    rules = {source_name(i, s): dataclasses.replace(source_rules(s, data), pseudonym_key=pseudonym_key)
             for i, s in enumerate(data.sources)}
    by_name = {source_name(i, s): s for i, s in enumerate(data.sources)}
    cpus = data.cpus_per_task
    # records on the suppression list (`raylab erase`) are no more indexed than trained on
    checked = _check_sources(data, rules, lineage.suppression())
    accepted = checked.map_batches(_where, batch_format="pyarrow", num_cpus=cpus,
                                   fn_kwargs={"accepted": True, "columns": DOC_COLUMNS}).materialize()
    drops = dedup.find_duplicates(accepted, data.dedup, cpus)
    docs = accepted.map_batches(_without, batch_format="pyarrow", num_cpus=cpus, fn_kwargs={"drops": frozenset(drops)}
                                ).map_batches(_with_origin, batch_format="pyarrow", num_cpus=cpus,
                                              fn_kwargs={"sources": by_name}).materialize()
    by_reason: dict[str, int] = {}
    for g in checked.map_batches(count_batch, batch_format="pyarrow").take_all():
        if g["reason"]:
            by_reason[g["reason"]] = by_reason.get(g["reason"], 0) + g["n"]
    erased = by_reason.pop(ERASED, 0)
    read, documents = checked.count(), docs.count()
    dup = duplicate_counts(drops)
    counts = {"read": read, "accepted": documents, "rejected": sum(by_reason.values()), "rejected_by_reason": by_reason,
              "duplicates": dup, "erased": erased, "pii_redactions": pii_totals(checked)}
    return docs, counts


def document_text(text: str, messages: str) -> str:
    """The text a document is chunked as: completion text, or a conversation's messages one
    after another (role names left out: they would be retrieved as content)."""
    if not messages:
        return text
    return "\n\n".join(m["content"] for m in json.loads(messages))

