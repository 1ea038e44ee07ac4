"""`raylab index CONFIG`: sources -> checked documents -> chunks -> vectors in LanceDB.

    raylab index configs/quickstart.yaml             # CLI
    raylab.rag.run_index(cfg)                        # Python; returns the manifest
    raylab.rag.search(index_dir, "question", top_k=4)

The stage, on Ray Data:
1. read `index.sources` (default `data.sources`) with the data stage's own validation,
   cleaning, PII redaction and dedup (`raylab.data.clean_documents`);
2. chunk every document in the embedder's tokens (chunking.py) in Ray Data tasks; each chunk
   carries its source's `org` and `acl` (who may retrieve it, store.access_filter);
3. compare with the table already in `index.directory`: chunks whose id is there stay,
   chunks whose text was embedded before get that vector copied, only the rest are embedded,
   on an actor pool of `index.actors` embedders (GPU actors when the cluster has GPUs), or,
   when they fit in one `index.batch_size` batch, by the model this process has loaded;
4. append the new rows in parallel (`write_lance`), delete the rows of changed or deleted
   documents, build the IVF-PQ index at or above `index.ann.min_rows` chunks (store.py);
   with `index.hybrid` (the default) (re)build LanceDB's full-text index over chunk text for
   hybrid search. With `index.store: pgvector` the same steps run against a PostgreSQL table
   (pgstore.py: parallel upserts from Ray Data write tasks, HNSW, a tsvector GIN index), and
   the index directory keeps only the manifest;
5. write `raylab_index.json` in the index directory: the model and dimensions (a later build
   with another model is refused: its vectors would not compare), counts, timings.
"""

from __future__ import annotations

import datetime
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from raylab import data as data_stage
from raylab.config import RaylabConfig
from raylab.core import events, plan, runs, storage
from raylab.errors import UserError
from raylab.rag import chunking, embedder, pgstore, store, stores

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
CHUNK_BLOCK_DOCS = 512  # documents per chunking task


def index_directory(cfg: RaylabConfig) -> str:
    return cfg.index.directory or runs.Run(cfg.output_dir).index


def run_index(cfg: RaylabConfig, address: str | None = None) -> dict:
    """Build or update the index; returns the manifest (also written to the index directory)."""
    with events.stage("index", run=cfg.output_dir):
        return _run_index(cfg, address)


def _check_model(spec: embedder.Spec, ix, directory: str) -> None:
    if ix.chunk_tokens > spec.max_chunk_tokens:
        raise UserError(f"index.chunk_tokens={ix.chunk_tokens} is more than the embedder {spec.name} reads: "
                        f"{spec.max_chunk_tokens} tokens (max_seq_length {spec.max_seq_length} less "
                        f"{spec.special_tokens} special tokens); it would truncate the rest silently")
    location = runs.index_manifest(directory)
    if not storage.exists(location):
        return
    before = runs.read_json(location, runs.IndexManifest)
    if before.store != ix.store:
        raise UserError(f"index.store: the index at {directory} keeps its chunks in {before.store}, not {ix.store}; "
                        "set index.store back, or index into a new index.directory")
    if (before.model, before.dimensions) != (spec.name, spec.dimensions):
        raise UserError(f"index.model: the index at {directory} was built with {before.model} ({before.dimensions} "
                        f"dimensions), not {spec.name} ({spec.dimensions}); its vectors would not compare. Set "
                        "index.model back, or index into a new index.directory")


def _sources_key(message: str, own: bool) -> str:
    # the data stage names data.sources.N; with index.sources the user fixes index.sources.N
    return message.replace("data.sources.", "index.sources.") if own else message


def _documents(cfg: RaylabConfig):
    ix = cfg.index
    try:
        data_stage.describe_inputs(cfg.data if ix.sources is None else
                                   cfg.data.model_copy(update={"sources": ix.sources}))
        return data_stage.clean_documents(cfg.data, ix.sources)
    except UserError as e:
        raise UserError(_sources_key(str(e), ix.sources is not None)) from None


def _access(cfg: RaylabConfig) -> dict[str, tuple[str | None, list[str]]]:
    """source name -> (org, acl) of the indexed sources, as the config sets them."""
    sources = cfg.index.sources if cfg.index.sources is not None else cfg.data.sources
    return {data_stage.source_name(i, s): (s.org, sorted(set(s.acl))) for i, s in enumerate(sources)}


def _with_body(batch: pa.Table, access: dict[str, tuple[str | None, list[str]]]) -> pa.Table:
    bodies = [data_stage.document_text(t, m) for t, m in zip(batch["text"].to_pylist(), batch["messages"].to_pylist(),
                                                              strict=True)]
    names = batch["source"].to_pylist()
    return batch.select(["source", "record_id", "origin"]).append_column("body", pa.array(bodies, pa.string())) \
        .append_column("org", pa.array([access[n][0] for n in names], pa.string())) \
        .append_column("acl", pa.array([access[n][1] for n in names], pa.list_(pa.string())))


def _not_in(batch: pa.Table, ids: frozenset[str]) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch["chunk_id"], pa.array(list(ids), pa.string()))))


def _hash_in(batch: pa.Table, hashes: frozenset[str], inside: bool) -> pa.Table:
    mask = pc.is_in(batch["content_hash"], pa.array(list(hashes), pa.string()))
    return batch.filter(mask if inside else pc.invert(mask))


def _with_vectors(batch: pa.Table, vectors: pa.Table) -> pa.Table:
    """Rows whose text was embedded before, with that vector (content_hash is the key)."""
    where = {h: i for i, h in enumerate(vectors["content_hash"].to_pylist())}
    rows = pa.array([where[h] for h in batch["content_hash"].to_pylist()], pa.int64())
    return batch.append_column("vector", vectors["vector"].take(rows))


def _collect(ds, schema: pa.Schema) -> pa.Table:
    """A small dataset's rows on the driver (a filter's empty blocks carry no schema)."""
    import ray

    parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()


def _plan_changes(chunks, table) -> dict:
    """Which chunks stay, are copied, embedded or removed, from the ids alone."""
    id_columns = ["chunk_id", "content_hash"]
    new = _collect(chunks.select_columns(id_columns),
                   pa.schema([chunking.CHUNK_SCHEMA.field(c) for c in id_columns]))
    old = stores.of(table).ids(table) if table is not None else pa.table({"chunk_id": [], "content_hash": []})
    old_ids, new_ids = set(old["chunk_id"].to_pylist()), set(new["chunk_id"].to_pylist())
    old_hashes = set(old["content_hash"].to_pylist())
    fresh_hashes = [h for i, h in zip(new["chunk_id"].to_pylist(), new["content_hash"].to_pylist(), strict=True)
                    if i not in old_ids]
    copied = [h for h in fresh_hashes if h in old_hashes]
    return {"kept": old_ids & new_ids, "removed": sorted(old_ids - new_ids), "copy_hashes": frozenset(copied),
            "chunks": new.num_rows, "embed": len(fresh_hashes) - len(copied), "copied": len(copied)}


def _gpus(ix) -> float:
    if ix.gpus_per_actor is not None:
        return ix.gpus_per_actor
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _embed(rows, ix, spec: embedder.Spec):
    import ray

    return rows.repartition(target_num_rows_per_block=ix.batch_size * 4).map_batches(
        embedder.Embed, batch_format="pyarrow", batch_size=ix.batch_size, num_cpus=ix.cpus_per_actor,
        num_gpus=_gpus(ix), compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ix.actors),
        fn_constructor_kwargs={"path": spec.path, "threads": int(ix.cpus_per_actor)},
    )


def _embed_here(rows, spec: embedder.Spec):
    """At most one batch (an edit or two): embedded by the model this process loaded to check
    the config, since starting an actor pool, each actor loading the model, costs more."""
    import ray

    table = _collect(rows, chunking.CHUNK_SCHEMA)
    vectors = embedder.encode(spec.path, table["text"].to_pylist())
    return ray.data.from_arrow(table.append_column("vector", embedder.vector_array(vectors)))


def _run_index(cfg: RaylabConfig, address: str | None) -> dict:
    ix, directory = cfg.index, index_directory(cfg)
    for module in ("sentence_transformers", *stores.MODULES[ix.store]):
        embedder.require(module)
    spec = embedder.describe(ix.model)  # fails early: a model that does not load, a chunk size it cannot read
    _check_model(spec, ix, directory)
    plan.prepare(cfg, address)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    started = time.monotonic()
    docs, data_counts = _documents(cfg)
    timings = {"read_check_s": time.monotonic() - started}
    if data_counts["accepted"] == 0:
        raise UserError(f"nothing to index: none of the {data_counts['read']} records read from "
                        f"{'index.sources' if ix.sources is not None else 'data.sources'} was accepted "
                        f"(rejected {data_counts['rejected_by_reason']}, duplicates {data_counts['duplicates']}); "
                        "`raylab data CONFIG` writes the quarantine with each record's reason")
    # a block per file would be a task per file, each loading the tokenizer: group documents
    chunks = docs.repartition(target_num_rows_per_block=CHUNK_BLOCK_DOCS).map_batches(
        _with_body, batch_format="pyarrow", num_cpus=cfg.data.cpus_per_task, fn_kwargs={"access": _access(cfg)}
    ).map_batches(
        chunking.chunk_batch, batch_format="pyarrow", num_cpus=cfg.data.cpus_per_task,
        fn_kwargs={"tokenizer_path": spec.path, "size": ix.chunk_tokens, "overlap": ix.overlap}).materialize()
    timings["chunk_s"] = time.monotonic() - started - timings["read_check_s"]
    counts = _store_chunks(chunks, directory, ix, spec, timings)
    counts["documents"] = data_counts["accepted"]
    return _finish(cfg, directory, spec, counts, data_counts, timings, started)


def _store_chunks(chunks, directory: str, ix, spec: embedder.Spec, timings: dict) -> dict:
    t0 = time.monotonic()
    st, where = stores.backend(ix.store), directory if ix.store == "lancedb" else "index.database"
    db = stores.connect(ix.store, directory, ix.database)
    table = st.open_table(db, ix.table)
    if table is not None and st.vector_dimensions(table) != spec.dimensions:
        raise UserError(f"index.model: the table {ix.table} in {where} holds {st.vector_dimensions(table)}-"
                        f"dimensional vectors; {spec.name} makes {spec.dimensions}. Index into a new index.directory")
    if table is not None and not st.has_access_columns(table):
        raise UserError(f"index.directory: the table {ix.table} in {directory} was built before chunks carried "
                        "org/acl columns; index into a new index.directory")
    changes = _plan_changes(chunks, table)
    if changes["chunks"] == 0:
        raise UserError("nothing to index: the accepted documents hold no text the embedder tokenizes")
    fresh = chunks.map_batches(_not_in, batch_format="pyarrow", fn_kwargs={"ids": frozenset(changes["kept"])})
    copy_hashes = changes["copy_hashes"]
    to_embed = fresh.map_batches(_hash_in, batch_format="pyarrow", fn_kwargs={"hashes": copy_hashes, "inside": False})
    embedded = changes["embed"]
    parts = []
    if embedded > ix.batch_size:
        parts.append(_embed(to_embed, ix, spec))
    elif embedded:
        parts.append(_embed_here(to_embed, spec))
    if copy_hashes:
        vectors = st.vectors_for(table, sorted(copy_hashes))
        parts.append(fresh.map_batches(_hash_in, batch_format="pyarrow", fn_kwargs={"hashes": copy_hashes, "inside": True})
                     .map_batches(_with_vectors, batch_format="pyarrow", fn_kwargs={"vectors": vectors}))
    if parts:
        rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        if st is pgstore:
            # the table first (its vector(d) column), then every write task upserts into it
            table = table or pgstore.create_table(db, ix.table, spec.dimensions)
            pgstore.append(rows, db, ix.table)
        else:
            store.append(rows, directory, ix.table, create=table is None)
            table = store.open_table(db, ix.table)
    st.delete(table, changes["removed"])
    timings["embed_write_s"] = time.monotonic() - t0
    t1 = time.monotonic()
    changed = bool(parts or changes["removed"])
    ann = st.ann_index(table, ix.ann, spec.dimensions, changed)
    timings["ann_s"] = time.monotonic() - t1
    t2 = time.monotonic()
    full_text = None
    if ix.hybrid:
        full_text = st.full_text_index(table, changed)
    elif st.has_full_text(table):  # index.hybrid turned off: no stale keyword index left behind
        stores.drop_full_text(table)
    timings["full_text_s"] = time.monotonic() - t2
    counts = {"chunks": changes["chunks"], "rows": table.count_rows(), "embedded": embedded,
              "reused": changes["chunks"] - embedded, "copied": changes["copied"], "removed": len(changes["removed"])}
    return counts | {"ann": ann, "full_text": full_text}


def _finish(cfg: RaylabConfig, directory: str, spec: embedder.Spec, counts: dict, data_counts: dict,
            timings: dict, started: float) -> dict:
    ann, full_text = counts.pop("ann"), counts.pop("full_text")
    timings["total_s"] = time.monotonic() - started
    manifest = runs.IndexManifest(
        version=MANIFEST_VERSION,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        table=cfg.index.table, model=spec.name, dimensions=spec.dimensions, max_seq_length=spec.max_seq_length,
        chunk_tokens=cfg.index.chunk_tokens, overlap=cfg.index.overlap, metric=store.METRIC, rows=counts.pop("rows"),
        counts=counts, data=data_counts, ann=ann, full_text=full_text, timings={k: round(v, 3) for k, v in timings.items()},
        store=cfg.index.store, database=cfg.index.database if cfg.index.store == pgstore.KIND else None,
    )
    runs.write_json(runs.index_manifest(directory), manifest)
    c = manifest.counts
    log.info(f"index: {c['documents']} documents -> {c['chunks']} chunks in {directory} ({spec.name}, "
             f"{spec.dimensions} dimensions): {c['embedded']} embedded, {c['reused']} reused, {c['removed']} removed; "
             f"{ann.get('kind', 'IVF-PQ').upper() + ' index' if ann['built'] else 'exact search'}{', full-text index' if full_text else ''} over "
             f"{manifest.rows} rows "
             f"({timings['total_s']:.0f}s)")
    return manifest.model_dump(mode="json")
