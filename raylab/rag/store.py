"""The vector store: a LanceDB table of chunks in a directory (a local path or s3://...).

    db = connect(directory); table = open_table(db, "chunks")      # None when absent
    append(ds, directory, "chunks", create=True)   # Ray Data's parallel write_lance
    delete(table, ids)                             # LanceDB's own delete
    ann_index(table, cfg.index.ann, dims)           # IVF-PQ at or above ann.min_rows, else none
    full_text_index(table, changed)                # LanceDB's native BM25 index over `text`
    nearest(table, vector, top_k, nprobes, refine, where=access_filter(org))   # rows with a cosine `score`
    keyword(table, "query", top_k, where)          # rows with a BM25 `score`
    hybrid(table, vector, "query", top_k, nprobes, refine, where)   # both, fused by reciprocal rank
    by_id(table, chunk_id)                         # one row, or None

Ray Data's `write_lance` creates or appends in parallel (each write task writes fragments,
the driver commits once) but cannot update or delete rows, so removals go through LanceDB's
`delete` after the append. Chunk ids are content-addressed (chunking.py): an edited chunk is
a new id plus a removed one, so no row is ever updated in place and no merge is needed.

Hybrid search fuses a vector (cosine) ranking and a keyword (BM25) ranking by reciprocal rank
fusion (Cormack et al. 2009): score = sum over the rankings of 1 / (RRF_K + rank). Ranks,
not scores, because the two scores are not on one scale: cosine similarity lies in [-1, 1]
whatever the query, BM25 is unbounded and grows with the query's length and its terms'
rarity in this table, so any weighted sum would need a weight re-tuned per query and corpus.
A chunk both rankings place high wins; a chunk only one finds (an exact rare keyword such as
an error code or a part number, which a sentence embedding barely registers) still enters the
top k. LanceDB's own RRFReranker does the same fusion; done here, the vector leg keeps its
nprobes/refine_factor and the access filter applies to both legs the same way.

Access: a chunk carries `org` (None: readable by every caller) and `acl` (further orgs that
may read it). `access_filter(org)` is the SQL every search applies as a pre-filter, so a
caller's top k is drawn only from chunks it may read (a post-filter would return fewer).
"""

from __future__ import annotations

import math

import pyarrow as pa

from raylab.core import runs
from raylab.errors import UserError

METRIC = "cosine"
_IN_LIST = 1000  # ids per SQL IN (...) filter
RRF_K = 60  # the constant of Cormack et al.; damps the weight of the very first ranks
ACCESS_COLUMNS = ("org", "acl")


def table_uri(directory: str, table: str) -> str:
    return runs.index_table(directory, table)


def connect(directory: str):
    import lancedb

    return lancedb.connect(directory)


def open_table(db, name: str):
    try:
        return db.open_table(name)
    except ValueError:  # LanceDB: "Table '<name>' was not found"
        return None


def vector_dimensions(table) -> int:
    return table.schema.field("vector").type.list_size


def _quoted(ids: list[str]) -> str:
    return ", ".join("'" + i.replace("'", "''") + "'" for i in ids)


def ids(table) -> pa.Table:
    """(chunk_id, content_hash) of every row."""
    return table.search().select(["chunk_id", "content_hash"]).limit(None).to_arrow()


def vectors_for(table, hashes: list[str]) -> pa.Table:
    """(content_hash, vector) of one row per given hash, to copy instead of re-embedding."""
    parts = [table.search().where(f"content_hash IN ({_quoted(hashes[i:i + _IN_LIST])})")
             .select(["content_hash", "vector"]).limit(None).to_arrow() for i in range(0, len(hashes), _IN_LIST)]
    if not parts:
        return pa.table({"content_hash": pa.array([], pa.string())})
    found = pa.concat_tables(parts)
    first: dict[str, int] = {}
    for i, h in enumerate(found["content_hash"].to_pylist()):
        first.setdefault(h, i)  # the same text in several documents: one vector serves all
    return found.take(list(first.values()))


def append(ds, directory: str, table: str, create: bool) -> None:
    """Write a Ray Dataset of chunk rows (with `vector`) in parallel."""
    ds.write_lance(table_uri(directory, table), mode="create" if create else "append")


def delete(table, chunk_ids: list[str]) -> None:
    for i in range(0, len(chunk_ids), _IN_LIST):
        table.delete(f"chunk_id IN ({_quoted(chunk_ids[i:i + _IN_LIST])})")


def ann_index(table, ann, dims: int, changed: bool) -> dict:
    """IVF-PQ over `vector` when the table has ann.min_rows rows or more (rebuilt when rows
    changed: PQ codebooks and partitions are trained on the rows there were); below it, none,
    so searches are exact. Returns what the manifest records."""
    rows = table.count_rows()
    existing = _vector_indices(table)
    if rows < ann.min_rows:
        for name in existing:
            table.drop_index(name)
        return {"built": False, "rows": rows, "min_rows": ann.min_rows}
    partitions = ann.num_partitions or max(1, int(math.sqrt(rows)))
    sub_vectors = ann.num_sub_vectors or (dims // 8 if dims % 8 == 0 else 1)
    if dims % sub_vectors:
        raise UserError(f"index.ann.num_sub_vectors={sub_vectors} must divide the embedding dimension {dims}")
    if changed or not existing:
        from lancedb.index import IvfPq

        table.create_index("vector", replace=True,  # LanceDB's API: the column, then the index config
                           config=IvfPq(distance_type=METRIC, num_partitions=partitions, num_sub_vectors=sub_vectors))
    return {"built": True, "rows": rows, "min_rows": ann.min_rows, "num_partitions": partitions,
            "num_sub_vectors": sub_vectors}


def _vector_indices(table) -> list[str]:
    return [i.name for i in table.list_indices() if list(i.columns) == ["vector"]]


def has_full_text(table) -> bool:
    return any(i.index_type == "FTS" and list(i.columns) == ["text"] for i in table.list_indices())


def full_text_index(table, changed: bool) -> dict:
    """LanceDB's native full-text (BM25, inverted) index over `text`, rebuilt when rows changed
    (rows appended after it was built would be searched by a scan). Returns what the manifest
    records."""
    if changed or not has_full_text(table):
        from lancedb.index import FTS

        # English stemming and stop words: "refunds" finds "refund"; a rare token (a code, a
        # name) is kept whole, which is what the keyword leg of a hybrid search is for
        table.create_index("text", replace=True, config=FTS())
    return {"built": True, "column": "text", "rows": table.count_rows()}


def has_access_columns(table) -> bool:
    return all(c in table.schema.names for c in ACCESS_COLUMNS)


def access_filter(org: str | None) -> str:
    """The rows a caller of `org` may read: chunks without an org, its org's, and those whose
    ACL names it. org None (single-tenant mode, or a caller without an org): only chunks
    without an org, so an index with org-owned chunks never leaks them to an anonymous caller."""
    if org is None:
        return "org IS NULL"
    q = _quoted([org])
    return f"org IS NULL OR org = {q} OR array_has(acl, {q})"


def readable(org: str | None, row_org: str | None, row_acl) -> bool:
    """access_filter's rule for one row held outside a store (a data run's records, whose
    sources name their org): whether a caller of `org` may read it."""
    return row_org is None or (org is not None and (row_org == org or org in (row_acl or ())))


ROW_COLUMNS = ["chunk_id", "source", "origin", "record_id", "start", "end", "text"]


def by_id(table, chunk_id: str, where: str | None = None) -> dict | None:
    """One chunk's row (ROW_COLUMNS), or None when the table has no such id (that `where` admits)."""
    condition = f"chunk_id = {_quoted([chunk_id])}" + (f" AND ({where})" if where else "")
    rows = table.search().where(condition).select(ROW_COLUMNS).limit(1).to_list()
    return rows[0] if rows else None


def nearest(table, vector, top_k: int, nprobes: int, refine_factor: int | None, where: str | None = None
            ) -> list[dict]:
    """The top_k rows nearest to `vector` (exact without an index), best first, with
    score = cosine similarity; `where` (an SQL filter, e.g. access_filter) applied first."""
    query = table.search(vector, vector_column_name="vector").distance_type(METRIC).limit(top_k)
    if where is not None:
        query = query.where(where, prefilter=True)
    if _vector_indices(table):
        query = query.nprobes(nprobes)
        if refine_factor:
            query = query.refine_factor(refine_factor)
    rows = query.select([*ROW_COLUMNS, "_distance"]).to_list()
    return [{**{k: v for k, v in r.items() if k != "_distance"}, "score": 1.0 - float(r["_distance"])} for r in rows]


def keyword(table, text: str, top_k: int, where: str | None = None) -> list[dict]:
    """The top_k rows by BM25 over the full-text index, best first, score = BM25. The query
    is matched as words (no query syntax), so a user's quotes or colons are just text."""
    query = table.search(text, query_type="fts").limit(top_k)
    if where is not None:
        query = query.where(where, prefilter=True)
    rows = query.select([*ROW_COLUMNS, "_score"]).to_list()
    return [{**{k: v for k, v in r.items() if k != "_score"}, "score": float(r["_score"])} for r in rows]


def fuse(rankings: list[list[dict]], top_k: int) -> list[dict]:
    """Reciprocal rank fusion of rankings (each best first, rows keyed by chunk_id): the
    top_k rows by sum of 1 / (RRF_K + rank), ties kept in first-seen order; each row with
    score = that sum and its rank in each ranking (None: absent from it)."""
    fused: dict[str, dict] = {}
    for leg, ranking in enumerate(rankings):
        for rank, row in enumerate(ranking, 1):
            entry = fused.setdefault(row["chunk_id"], {**row, "score": 0.0, "ranks": [None] * len(rankings)})
            entry["score"] += 1.0 / (RRF_K + rank)
            entry["ranks"][leg] = rank
    return sorted(fused.values(), key=lambda r: -r["score"])[:top_k]


def hybrid(table, vector, text: str, top_k: int, nprobes: int, refine_factor: int | None,
           where: str | None = None, candidates: int | None = None) -> list[dict]:
    """The top_k rows of the vector and keyword rankings fused (`fuse`); each leg ranks
    `candidates` rows (default 4 * top_k, at least 20), so a chunk ranked just below top_k by
    both legs can still win."""
    n = candidates or max(20, 4 * top_k)
    return fuse([nearest(table, vector, n, nprobes, refine_factor, where), keyword(table, text, n, where)], top_k)
