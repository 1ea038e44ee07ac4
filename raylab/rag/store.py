"""The vector store: a LanceDB table of chunks in a directory (a local path or s3://...).

    db = connect(directory); table = open_table(db, "chunks")      # None when absent
    append(ds, directory, "chunks", create=True)   # Ray Data's parallel write_lance
    delete(table, ids)                             # LanceDB's own delete
    ann_index(table, cfg.index.ann, dims)           # IVF-PQ at or above ann.min_rows, else none
    nearest(table, vector, top_k, cfg.index.ann)    # rows with a cosine `score`
    by_id(table, chunk_id)                         # one row, or None

Ray Data's `write_lance` creates or appends in parallel (each write task writes fragments,
the driver commits once) but cannot update or delete rows, so removals go through LanceDB's
`delete` after the append. Chunk ids are content-addressed (chunking.py): an edited chunk is
a new id plus a removed one, so no row is ever updated in place and no merge is needed.
"""

from __future__ import annotations

import math

import pyarrow as pa

from raylab.core import runs
from raylab.errors import UserError

METRIC = "cosine"
_IN_LIST = 1000  # ids per SQL IN (...) filter


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
    existing = [i.name for i in table.list_indices()]
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


ROW_COLUMNS = ["chunk_id", "source", "origin", "record_id", "start", "end", "text"]


def by_id(table, chunk_id: str) -> dict | None:
    """One chunk's row (ROW_COLUMNS), or None when the table has no such id."""
    rows = table.search().where(f"chunk_id = {_quoted([chunk_id])}").select(ROW_COLUMNS).limit(1).to_list()
    return rows[0] if rows else None


def nearest(table, vector, top_k: int, nprobes: int, refine_factor: int | None) -> list[dict]:
    """The top_k rows nearest to `vector` (exact without an index), best first, with
    score = cosine similarity."""
    query = table.search(vector, vector_column_name="vector").distance_type(METRIC).limit(top_k)
    if table.list_indices():
        query = query.nprobes(nprobes)
        if refine_factor:
            query = query.refine_factor(refine_factor)
    rows = query.select(ROW_COLUMNS).to_list()
    return [{**{k: v for k, v in r.items() if k != "_distance"}, "score": 1.0 - float(r["_distance"])} for r in rows]
