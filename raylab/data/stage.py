"""The data stage: sources -> parsed, normalised, validated records + quarantine + manifest.

    raylab data configs/quickstart.yaml          # CLI
    raylab.data.run_data(cfg)                    # Python; returns the manifest

What it does, on Ray Data: read every source (sources/) into one dataset of raw records;
normalise each to its format, clean it, check the validation rules and redact PII
(records.py, raylab/core/detectors.py); drop exact and near duplicates across the whole
dataset (dedup.py); with `pretrain.tokenizer`, train a BPE tokenizer on the redacted train
split (vocab.py); tokenize in an actor pool, split train/val by record id, and pack
(packing.py, which documents the trainer contract); write zstd Parquet and `manifest.json`.
No record stops the job: a broken one is quarantined with a reason code. A source that
cannot be read at all, or a rejected fraction above `data.validation.max_rejected_fraction`,
fails the stage with exit 2 (after the quarantine and manifest are written, so nothing is
lost).

Outputs under `<output_dir>/data/` (raylab/core/runs.py):
    train/, val/*.parquet  packed sequences (packing.py: input_ids, labels, position_ids,
                           segment_ids, num_tokens)
    records/*.parquet      the accepted documents, redacted: source, record_id, format, text,
                           messages (JSON), split, num_tokens (for evaluation and inspection)
    quarantine/*.parquet   rejected: source, record_id, reason, message, raw -- SENSITIVE:
                           it holds records exactly as read, personal data included
    tokenizer/             with pretrain.tokenizer: the tokenizer trained on the redacted corpus
    manifest.json          inputs (files with sha256), config hash, tokenizer fingerprint,
                           counts (always read = accepted + rejected + duplicates), PII
                           redactions by type, tokens, packing efficiency, length histogram
    datasheet.{md,json}    the manifest's facts as answers to "Datasheets for Datasets" (datasheet.py)

Re-running with unchanged file inputs, data config and suppression list is a cache hit
(nothing is re-read); SQL and HTTP inputs cannot be fingerprinted without reading them, so
they always rebuild. Records on the suppression list (`raylab erase`, core/lineage.py) are
dropped as they are checked and counted `erased`, written nowhere; the accepted record ids go
to the lineage index in the control-plane database when the stage finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import secrets
import time

import pyarrow as pa
import pyarrow.compute as pc

from raylab import config, models
from raylab.config import DataConfig, ModelConfig, RaylabConfig
from raylab.core import events, lineage, plan, runs, storage
from raylab.data import datasheet, dedup, packing, records, stats, vocab
from raylab.data.sources import SourceError, describe_inputs, read_source, source_name, source_rules
from raylab.errors import UserError

log = logging.getLogger(__name__)


MANIFEST_VERSION = 1
CHECKED_SCHEMA = pa.schema([(n, pa.string()) for n in
                            ("source", "record_id", "raw", "format", "text", "messages", "reason", "message", "pii")])
DOC_COLUMNS = ["source", "record_id", "raw", "format", "text", "messages"]
RECORD_COLUMNS = ["source", "record_id", "format", "text", "messages", "split", "num_tokens"]
QUARANTINE_COLUMNS = ["source", "record_id", "reason", "message", "raw"]
TOKENIZE_BLOCK_ROWS = 2048
ERASED = stats.ERASED  # the reason a suppressed record carries until it is counted


# ---------------------------------------------------------------- Ray Data transforms


def check_batch(batch: pa.Table, rules: dict[str, records.SourceRules],
                erase: lineage.Suppression = lineage.Suppression()) -> pa.Table:
    compiled = {name: (r.compiled(), r.detectors()) for name, r in rules.items()}
    rows = [_erased_row(row) if erase.matches(row["source"], row["record_id"])
            else records.check_row(row, rules[row["source"]], *compiled[row["source"]]) for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=CHECKED_SCHEMA)


def _erased_row(row: dict) -> dict:
    """A suppressed record (`raylab erase`): only its id goes on, to be counted; its content
    goes nowhere (not to the quarantine either)."""
    return {"source": row["source"], "record_id": row["record_id"], "raw": "", "format": "", "text": "",
            "messages": "", "reason": ERASED, "message": "", "pii": ""}


def tokenize(docs, data: DataConfig, model: ModelConfig):
    """Documents (DOC_COLUMNS) -> token ids and labels, in an actor pool that loads the
    tokenizer once per actor (packing.Tokenize)."""
    import ray

    # Small corpora can arrive as one block, which one actor would tokenize alone: bound
    # the rows per block (a streaming repartition) so every actor gets work.
    return docs.repartition(target_num_rows_per_block=TOKENIZE_BLOCK_ROWS).map_batches(
        packing.Tokenize, batch_format="pyarrow", batch_size=256, num_cpus=data.cpus_per_task,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=data.tokenizer_actors),
        fn_constructor_kwargs={
            "model_cfg": model.model_dump(), "max_tokens": data.validation.max_tokens or data.max_seq_len,
            "over": data.validation.over_max_tokens, "train_on_prompt": data.train_on_prompt,
        },
    )


def pack(tokenized, data: DataConfig, pad_id: int):
    """Tokenized documents -> fixed-length training rows (packing.pack_batch's contract)."""
    return tokenized.map_batches(
        packing.pack_batch, batch_format="pyarrow", batch_size=1024, num_cpus=data.cpus_per_task,
        fn_kwargs={"seq_len": data.max_seq_len, "pad_id": pad_id, "mode": data.packing},
    )


def _where(batch: pa.Table, accepted: bool, columns: list[str]) -> pa.Table:
    """The accepted rows, or the rejected ones (erased records are neither)."""
    if accepted:
        return batch.filter(pc.equal(batch["reason"], "")).select(columns)
    rejected = pc.and_(pc.not_equal(batch["reason"], ""), pc.not_equal(batch["reason"], ERASED))
    return batch.filter(rejected).select(columns)


def _without(batch: pa.Table, drops: frozenset[str]) -> pa.Table:
    keep = [rid not in drops for rid in batch["record_id"].to_pylist()]
    return batch.filter(pa.array(keep, type=pa.bool_()))


def _with_split(batch: pa.Table, seed: int, fraction: float, val_sources: list[str]) -> pa.Table:
    split = ["val" if packing.in_val(r, seed, fraction, s, val_sources) else "train"
             for r, s in zip(batch["record_id"].to_pylist(), batch["source"].to_pylist(), strict=True)]
    lengths = pc.list_value_length(batch["input_ids"]).cast(pa.int32())
    return batch.append_column("split", pa.array(split)).append_column("num_tokens", lengths)


def _of_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch["split"], split))


# ---------------------------------------------------------------- the cache


def _config_hash(data: DataConfig, model: ModelConfig, corpus_tokenizer=None) -> str:
    """The data section plus the model section (the tokenizer decides the tokens), plus
    pretrain.tokenizer when the tokenizer is trained on the corpus."""
    material = data.model_dump_json() + model.model_dump_json()
    if corpus_tokenizer is not None:
        material += corpus_tokenizer.model_dump_json()
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _cached(run: runs.Run, key: str) -> runs.DataManifest | None:
    if not storage.exists(run.manifest):
        return None
    try:
        manifest = runs.read_json(run.manifest, runs.DataManifest)
    except (OSError, UserError):
        return None
    return manifest if manifest.cache_key == key and manifest.version == MANIFEST_VERSION else None


def _cache_key(config_hash: str, inputs: list[dict], erase: lineage.Suppression) -> str | None:
    """Config, input files and the suppression list: after an erasure no cached output is
    served (it may hold the erased record), so the next run rebuilds and drops it."""
    if any(i["type"] in ("sql", "http") for i in inputs):
        return None
    material = json.dumps([config_hash, [[f["sha256"] for f in i["files"]] for i in inputs], erase.digest])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _unwrap_source_error(e: BaseException) -> SourceError | None:
    """The SourceError a read task raised, however Ray wrapped it: its own message, one line
    by construction, without the remote traceback (the wrapper's) or the retry advice Ray
    Data appends to the exception's text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError keeps the task's exception here
        if isinstance(cause, SourceError) or type(e) is SourceError:
            return SourceError(str(cause if isinstance(cause, SourceError) else e).strip().splitlines()[0])
        for line in str(e).splitlines():  # a wrapper that kept only the text
            if "SourceError: data source '" in line:
                return SourceError(line.split("SourceError: ", 1)[1])
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def _quiet_ray_data_errors():
    """Ray Data logs a failed task's traceback at ERROR before raising it. For a source that
    cannot be read that is a user error (one line, exit 2); anything else is raised on with
    its remote traceback (a RayTaskError's message holds it), so the log adds nothing."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------- the stage


def _check_sources(data: DataConfig, rules: dict[str, records.SourceRules], erase: lineage.Suppression):
    """Every source read and every record checked, in one materialised pass (Ray spills to
    disk beyond the object store, so memory stays bounded). Nothing is written before it
    ends, so a source that fails leaves no part of the stage's output behind."""
    try:
        with _quiet_ray_data_errors():
            parts = [read_source(i, s, data) for i, s in enumerate(data.sources)]
            raw = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
            return raw.map_batches(check_batch, batch_format="pyarrow", num_cpus=data.cpus_per_task,
                                   fn_kwargs={"rules": rules, "erase": erase}).materialize()
    except Exception as e:
        source_error = _unwrap_source_error(e)
        if source_error is not None:
            raise UserError(str(source_error)) from None
        raise


def _write_outputs(run: runs.Run, checked, tokenized, good, data: DataConfig, pad_id: int) -> dict[str, dict]:
    """Quarantine, records and the packed splits as zstd Parquet; the packed counts per split."""
    cpus = data.cpus_per_task
    for name in runs.SPLITS:
        storage.reset_dir(run.split(name))
    rejects = [ds.map_batches(_where, batch_format="pyarrow", num_cpus=cpus,
                              fn_kwargs={"accepted": False, "columns": QUARANTINE_COLUMNS}) for ds in (checked, tokenized)]
    storage.write_parquet(rejects[0].union(rejects[1]), run.split("quarantine"))
    storage.write_parquet(good.select_columns(RECORD_COLUMNS), run.split("records"))
    packed_by_split = {}
    for split in ("train", "val"):
        part = good.map_batches(_of_split, batch_format="pyarrow", fn_kwargs={"split": split})
        packed = pack(part, data, pad_id).materialize()
        storage.write_parquet(packed, run.split(split))
        rows = packed.map_batches(stats.packed_stats, batch_format="pyarrow").take_all()
        packed_by_split[split] = {"sequences": sum(r["sequences"] for r in rows),
                                  "real_tokens": sum(r["real_tokens"] for r in rows)}
    return packed_by_split


def _phase(n: int, what: str, started: float) -> None:
    """The stage's progress on the console: which of its 4 phases finished, and when."""
    log.info(f"data: {n}/4 {what} ({time.monotonic() - started:.0f}s)")


def run_data(cfg: RaylabConfig, address: str | None = None) -> dict:
    """Run the data stage; returns the manifest (also written to data/manifest.json)."""
    with events.stage("data", run=cfg.output_dir):
        return _run_data(cfg, address)


def _run_data(cfg: RaylabConfig, address: str | None) -> dict:
    d, run = cfg.data, runs.Run(cfg.output_dir)
    corpus_tokenizer = cfg.pretrain.tokenizer if cfg.pretrain is not None else None
    if corpus_tokenizer is not None:
        vocab.check(cfg)
    inputs = describe_inputs(d)
    config_hash = _config_hash(d, cfg.model, corpus_tokenizer)
    erase = lineage.suppression()
    key = _cache_key(config_hash, inputs, erase)
    if key and (hit := _cached(run, key)) and (corpus_tokenizer is None or storage.exists(run.tokenizer)):
        log.info(f"data: cache hit ({run.manifest}); inputs, data config and suppression list unchanged")
        _index(run, hit)  # a run made before the index existed, or indexed in another database
        if not storage.exists(run.datasheet("json")):  # a run made before datasheets existed
            datasheet.write(run, hit, cfg)
        return hit.model_dump(mode="json") | {"cache": {"hit": True}}

    if corpus_tokenizer is None:
        tok = models.load_tokenizer(cfg.model)  # fails early on a bad model; materialises a preset once
    plan.prepare(cfg, address)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    config.write_resolved(cfg)
    # one per run: equal values, equal pseudonyms (not `key`: that name is the cache key above)
    pseudonym_key = secrets.token_bytes(32) if d.pii.pseudonymize else None
    rules = {source_name(i, s): dataclasses.replace(source_rules(s, d), pseudonym_key=pseudonym_key)
             for i, s in enumerate(d.sources)}
    cpus = d.cpus_per_task
    started = time.monotonic()
    checked = _check_sources(d, rules, erase)
    accepted = checked.map_batches(_where, batch_format="pyarrow", num_cpus=cpus,
                                   fn_kwargs={"accepted": True, "columns": DOC_COLUMNS}).materialize()
    _phase(1, f"read and checked {checked.count():,} records from {len(rules)} source(s), "
              f"{accepted.count():,} accepted", started)
    drops = dedup.find_duplicates(accepted, d.dedup, cpus)
    _phase(2, f"deduplicated: {len(drops):,} duplicate(s) dropped", started)
    kept = accepted.map_batches(_without, batch_format="pyarrow", num_cpus=cpus, fn_kwargs={"drops": frozenset(drops)})
    tokenizer_model = cfg.model
    if corpus_tokenizer is not None:  # trained here, on redacted text: vocab.py says why
        kept = kept.materialize()
        tokenizer_model = vocab.train(cfg, kept)
        tok = models.load_tokenizer(tokenizer_model)
    tokenized = tokenize(kept, d, tokenizer_model).materialize()
    _phase(3, f"templated and tokenized {tokenized.count():,} documents", started)
    good = tokenized.map_batches(_where, batch_format="pyarrow", num_cpus=cpus,
                                 fn_kwargs={"accepted": True, "columns": [*DOC_COLUMNS, "input_ids", "labels"]}
                                 ).map_batches(_with_split, batch_format="pyarrow", num_cpus=cpus,
                                               fn_kwargs={"seed": d.seed, "fraction": d.val_fraction,
                                                          "val_sources": d.val_sources}).materialize()
    packed = _write_outputs(run, checked, tokenized, good, d, tok.pad_token_id)
    _phase(4, f"packed {sum(p['sequences'] for p in packed.values()):,} sequences and wrote the splits", started)

    counts = stats.counts(checked, tokenized, drops, list(rules))
    manifest = runs.DataManifest(
        version=MANIFEST_VERSION,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config_hash=config_hash, cache_key=key,
        tokenizer=models.fingerprint(tok) | ({"trained_on_corpus": run.tokenizer} if corpus_tokenizer else {}),
        inputs=[{**i, "records_read": counts["by_source"][i["name"]]["read"]} for i in inputs],
        counts={k: v for k, v in counts.items() if k != "by_source"}, by_source=counts["by_source"],
        pii_redactions=stats.pii_totals(checked), tokens=stats.token_summary(good, packed, d.max_seq_len),
        outputs={name: run.split(name) for name in runs.SPLITS}, cache={"hit": False},
    )
    runs.write_json(run.manifest, manifest)
    datasheet.write(run, manifest, cfg)
    _index(run, manifest, good)
    _log_summary(manifest, run, d.max_seq_len)
    c, limit = manifest.counts, d.validation.max_rejected_fraction
    if limit is not None and c.rejected_fraction > limit:
        raise UserError(
            f"{c.rejected} of {c.read} records rejected ({c.rejected_fraction:.1%}), above "
            f"data.validation.max_rejected_fraction={limit:g}; see {run.split('quarantine')} and {run.manifest}"
        )
    return manifest.model_dump(mode="json")


def _index(run: runs.Run, manifest: runs.DataManifest, good=None) -> None:
    """The accepted record ids into the lineage index (core/lineage.py), so `raylab lineage`
    finds this run without scanning run directories. From the pipeline's own dataset when
    there is one; a cache hit reads them back from records/*.parquet."""
    digest = runs.manifest_hash(manifest)
    if lineage.is_indexed(run.root, digest):
        return
    if good is not None:
        ids = [(s, r) for batch in good.select_columns(["source", "record_id"]).iter_batches(batch_format="pyarrow")
               for s, r in zip(batch["source"].to_pylist(), batch["record_id"].to_pylist(), strict=True)]
    elif storage.parquet_files(run.split("records")):
        table = storage.read_table(run.split("records"), columns=["source", "record_id"])
        ids = list(zip(table["source"].to_pylist(), table["record_id"].to_pylist(), strict=True))
    else:  # no record was accepted
        ids = []
    lineage.index_run(run.root, digest, manifest.created, ids)


def _log_summary(manifest: runs.DataManifest, run: runs.Run, seq_len: int) -> None:
    c = manifest.counts
    erased = runs.erased_count(c)
    log.info(f"data: read {c.read}, accepted {c.accepted}, rejected {c.rejected} "
        f"({c.rejected_fraction:.1%}), duplicates {c.duplicates['exact']} exact + "
        f"{c.duplicates['near']} near" + (f", erased {erased}" if erased else "") + f" -> {run.data}")
    for reason, n in sorted(c.rejected_by_reason.items()):
        log.info(f"  quarantined {n:>5} {reason}")
    for kind, n in sorted(manifest.pii_redactions.items()):
        log.info(f"  redacted    {n:>5} {kind}")
    for split in ("train", "val"):
        t = getattr(manifest.tokens, split)
        log.info(f"  {split:<5} {t.documents} documents, {t.tokens} tokens ({t.target_tokens} targets) in "
            f"{t.sequences} x {seq_len} sequences, packing efficiency {t.packing_efficiency:.1%}")
