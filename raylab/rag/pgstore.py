"""The team vector store: a PostgreSQL table with pgvector, behind the same functions as the
LanceDB store (store.py), chosen by `index.store: pgvector` with `index.database`.

    index:
      store: pgvector
      database: ${env:RAYLAB_INDEX_DB}       # postgresql://user:pass@host/db, expanded where used

    db = connect(url); table = open_table(db, "chunks")     # None when absent
    create_table(db, "chunks", dims)                        # CREATE EXTENSION vector; the table
    append(ds, db, "chunks")                                # Ray Data's parallel write (ChunkSink)
    delete(table, ids); ann_index(table, cfg.index.ann, dims, changed)   # HNSW at or above ann.min_rows
    nearest / keyword / hybrid / by_id / all_rows             # as store.py, `where` = access_filter(org)

Table: the chunk columns (chunking.CHUNK_SCHEMA), `vector vector(d)`, and `tsv`, a generated
tsvector of `text` (English configuration) that the keyword leg searches through a GIN index.
`chunk_id` is the primary key and every write is INSERT ... ON CONFLICT (chunk_id) DO UPDATE,
so a write task that Ray Data retries, or two builds racing, upsert instead of duplicating.

Parallel writes: `append` is a Ray Data Datasink; each write task opens its own connection and
inserts its blocks in pages (execute_values), committing once per task. The URL travels to the
tasks in the datasink (Ray's object store, not any file raylab writes).

Approximate index: HNSW (pgvector, cosine) at or above `index.ann.min_rows` rows, none below,
so small tables are searched exactly (a scan ordered by `<=>`). HNSW rather than IVFFlat: it
needs no training on the rows there are, so incremental upserts and deletes keep it valid and
it is built once, not rebuilt after each change as IVF-PQ is. A filtered HNSW scan returns
at most ef_search rows before the filter; pgvector 0.8's iterative scan (`hnsw.iterative_scan`)
keeps scanning until the filter has admitted top_k, so an org's top k is not cut short.

Keyword leg: PostgreSQL has no BM25. The query's stemmed terms are OR-ed (a question's words
all in one chunk is rare, an AND would find nothing) and rows are ranked by `ts_rank`; hybrid
fuses by rank (store.fuse), so only the keyword ranking's order matters, not its scale.
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from raylab.rag import chunking
from raylab.rag.store import ROW_COLUMNS, fuse  # one row shape and one RRF for both stores

KIND = "pgvector"
COLUMNS = [f.name for f in chunking.CHUNK_SCHEMA] + ["vector"]
PAGE = 500  # rows per INSERT (execute_values)
HNSW = {"m": 16, "ef_construction": 64}  # pgvector's defaults, recorded in the manifest


def _sql():
    from psycopg2 import sql

    return sql


def _open(url: str):
    import psycopg2
    from pgvector.psycopg2 import register_vector

    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
    register_vector(conn)  # numpy arrays in and out of `vector` columns
    return conn


class Database:
    """A connection to the index's database (one per process; a lock serialises queries,
    since a serving replica may call from several threads)."""

    def __init__(self, url: str):
        self.url = url
        self.conn = _open(url)
        self.lock = threading.Lock()

    def query(self, statement, params=(), fetch: bool = True):
        with self.lock, self.conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if fetch else None


class Table:
    """One chunk table; `count_rows(where)` as LanceDB's table has it."""

    def __init__(self, db: Database, name: str):
        self.db, self.name = db, name
        sql = _sql()
        self.ident = sql.Identifier(name)

    def q(self, template: str, *idents):
        sql = _sql()
        return sql.SQL(template).format(self.ident, *[sql.Identifier(i) for i in idents])

    def count_rows(self, where: tuple | None = None) -> int:
        cond, params = where or ("TRUE", ())
        return int(self.db.query(self.q("SELECT count(*) FROM {} WHERE (" + cond + ")"), params)[0][0])


def connect(url: str) -> Database:
    return Database(url)


def open_table(db: Database, name: str) -> Table | None:
    found = db.query("SELECT to_regclass(%s)", (_sql().Identifier(name).as_string(db.conn),))[0][0]
    return Table(db, name) if found is not None else None


def create_table(db: Database, name: str, dims: int) -> Table:
    table = Table(db, name)
    db.query(table.q(
        "CREATE TABLE IF NOT EXISTS {} (chunk_id text PRIMARY KEY, content_hash text NOT NULL, source text, "
        'origin text, record_id text, start bigint, "end" bigint, text text NOT NULL, org text, acl text[] NOT NULL '
        f"DEFAULT ARRAY[]::text[], vector vector({int(dims)}) NOT NULL, "
        "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)"), fetch=False)
    db.query(_named_index(table, "content_hash", "(content_hash)"), fetch=False)  # vectors_for's lookup
    return table


def _named_index(table: Table, suffix: str, using: str):
    sql = _sql()
    return sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} " + using).format(
        sql.Identifier(f"{table.name}_{suffix}"), table.ident)


def vector_dimensions(table: Table) -> int:
    # a vector(d) column's type modifier is d
    return int(table.db.query("SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = "
                              "'vector'", (table.ident.as_string(table.db.conn),))[0][0])


def has_access_columns(table: Table) -> bool:
    """Whether the table has org and acl (a table of this name that raylab did not make, in a
    shared database, may not: it is refused rather than searched without the filter)."""
    found = {r[0] for r in table.db.query("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND "
                                          "attnum > 0 AND NOT attisdropped", (table.ident.as_string(table.db.conn),))}
    return {"org", "acl", "chunk_id", "tsv"} <= found


def ids(table: Table) -> pa.Table:
    rows = table.db.query(table.q("SELECT chunk_id, content_hash FROM {}"))
    return pa.table({"chunk_id": pa.array([r[0] for r in rows], pa.string()),
                     "content_hash": pa.array([r[1] for r in rows], pa.string())})


def vectors_for(table: Table, hashes: list[str]) -> pa.Table:
    """(content_hash, vector) of one row per given hash, to copy instead of re-embedding."""
    from raylab.rag import embedder

    rows = table.db.query(table.q("SELECT DISTINCT ON (content_hash) content_hash, vector FROM {} "
                                  "WHERE content_hash = ANY(%s)"), (list(hashes),))
    if not rows:
        return pa.table({"content_hash": pa.array([], pa.string())})
    return pa.table({"content_hash": [r[0] for r in rows],
                     "vector": embedder.vector_array(np.stack([np.asarray(r[1].to_numpy(), np.float32) for r in rows]))})


def _upsert(table: str):
    sql = _sql()
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)
    updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in COLUMNS[1:])
    return sql.SQL("INSERT INTO {} ({}) VALUES %s ON CONFLICT (chunk_id) DO UPDATE SET {}").format(
        sql.Identifier(table), cols, updates)


def write_rows(conn, table: str, batch: pa.Table) -> int:
    """Upsert an Arrow batch of chunk rows (with `vector`) in pages; returns the rows written."""
    from psycopg2.extras import execute_values

    statement = _upsert(table).as_string(conn)
    vectors = np.asarray(batch["vector"].combine_chunks().flatten(), np.float32).reshape(batch.num_rows, -1)
    data = batch.select(COLUMNS[:-1]).to_pylist()
    rows = [(*(r[c] if c != "acl" else (r[c] or []) for c in COLUMNS[:-1]), vectors[i]) for i, r in enumerate(data)]
    with conn.cursor() as cur:
        for i in range(0, len(rows), PAGE):
            execute_values(cur, statement, rows[i:i + PAGE], page_size=PAGE)
    return len(rows)


def _sink(url: str, table: str):
    from ray.data import Datasink

    class ChunkSink(Datasink):
        """Each write task: its own connection, its blocks upserted, one commit."""

        def write(self, blocks, ctx) -> None:
            import psycopg2
            from pgvector.psycopg2 import register_vector
            from ray.data.block import BlockAccessor

            conn = psycopg2.connect(url)
            try:
                register_vector(conn)
                for block in blocks:
                    write_rows(conn, table, BlockAccessor.for_block(block).to_arrow())
                conn.commit()
            finally:
                conn.close()

    return ChunkSink()


def append(ds, db: Database, table: str) -> None:
    """Write a Ray Dataset of chunk rows (with `vector`) in parallel (the table must exist)."""
    ds.select_columns(COLUMNS).write_datasink(_sink(db.url, table))


def delete(table: Table, chunk_ids: list[str]) -> None:
    if chunk_ids:
        table.db.query(table.q("DELETE FROM {} WHERE chunk_id = ANY(%s)"), (list(chunk_ids),), fetch=False)


def _index_names(table: Table) -> set[str]:
    return {r[0] for r in table.db.query("SELECT indexname FROM pg_indexes WHERE tablename = %s", (table.name,))}


def ann_index(table: Table, ann, dims: int, changed: bool) -> dict:
    """HNSW over `vector` (cosine) when the table has ann.min_rows rows or more; below it,
    none (exact search). Built once: HNSW takes later inserts and deletes without retraining,
    so `changed` does not rebuild it. Returns what the manifest records."""
    rows, name = table.count_rows(), f"{table.name}_vector_hnsw"
    if rows < ann.min_rows:
        table.db.query(_sql().SQL("DROP INDEX IF EXISTS {}").format(_sql().Identifier(name)), fetch=False)
        return {"built": False, "rows": rows, "min_rows": ann.min_rows}
    if name not in _index_names(table):
        table.db.query(_named_index(table, "vector_hnsw", "USING hnsw (vector vector_cosine_ops) WITH "
                                    f"(m = {HNSW['m']}, ef_construction = {HNSW['ef_construction']})"), fetch=False)
    return {"built": True, "rows": rows, "min_rows": ann.min_rows, "kind": "hnsw", **HNSW}


def has_ann(table: Table) -> bool:
    return f"{table.name}_vector_hnsw" in _index_names(table)


def has_full_text(table: Table) -> bool:
    return f"{table.name}_tsv_gin" in _index_names(table)


def full_text_index(table: Table, changed: bool) -> dict:
    """A GIN index over the generated tsvector (kept current by PostgreSQL on every write)."""
    table.db.query(_named_index(table, "tsv_gin", "USING gin (tsv)"), fetch=False)
    return {"built": True, "column": "text", "rows": table.count_rows(), "kind": "tsvector"}


def drop_full_text(table: Table) -> None:
    table.db.query(_sql().SQL("DROP INDEX IF EXISTS {}").format(_sql().Identifier(f"{table.name}_tsv_gin")),
                   fetch=False)


def access_filter(org: str | None) -> tuple[str, tuple]:
    """store.access_filter's rule as a parameterised condition (SQL, params)."""
    if org is None:
        return "org IS NULL", ()
    return "(org IS NULL OR org = %s OR %s = ANY(acl))", (org, org)


_SELECT = ", ".join(f'"{c}"' for c in ROW_COLUMNS)


def by_id(table: Table, chunk_id: str, where: tuple | None = None) -> dict | None:
    cond, params = where or ("TRUE", ())
    rows = table.db.query(table.q(f"SELECT {_SELECT} FROM {{}} WHERE chunk_id = %s AND ({cond}) LIMIT 1"),
                          (chunk_id, *params))
    return dict(zip(ROW_COLUMNS, rows[0], strict=True)) if rows else None


def all_rows(table: Table, where: tuple | None = None) -> list[dict]:
    cond, params = where or ("TRUE", ())
    return [dict(zip(ROW_COLUMNS, r, strict=True))
            for r in table.db.query(table.q(f"SELECT {_SELECT} FROM {{}} WHERE ({cond})"), params)]


def nearest(table: Table, vector, top_k: int, nprobes: int, refine_factor: int | None, where: tuple | None = None
            ) -> list[dict]:
    """The top_k rows nearest to `vector`, best first, score = cosine similarity; exact
    without the HNSW index. nprobes and refine_factor are IVF-PQ's knobs: HNSW's ef_search is
    set from top_k instead."""
    cond, params = where or ("TRUE", ())
    vec = np.asarray(vector, np.float32)
    statement = table.q(f"SELECT {_SELECT}, 1 - (vector <=> %s) FROM {{}} WHERE ({cond}) ORDER BY vector <=> %s "
                        "LIMIT %s")
    with table.db.lock, table.db.conn.cursor() as cur:
        cur.execute("BEGIN")
        try:
            # both are transaction-local: another query on this connection keeps the defaults
            cur.execute("SET LOCAL hnsw.ef_search = %s", (max(40, 2 * top_k),))
            cur.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            cur.execute(statement, (vec, *params, vec, top_k))
            rows = cur.fetchall()
        finally:
            cur.execute("COMMIT")
    return [{**dict(zip(ROW_COLUMNS, r[:-1], strict=True)), "score": float(r[-1])} for r in rows]


def keyword(table: Table, text: str, top_k: int, where: tuple | None = None) -> list[dict]:
    """The top_k rows by ts_rank over the query's stemmed terms OR-ed, best first."""
    cond, params = where or ("TRUE", ())
    # plainto_tsquery parses the text as words (no query syntax: quotes and colons are text)
    # and ANDs them; its rendering's & become | for an any-term match
    query = "(SELECT replace(plainto_tsquery('english', %s)::text, '&', '|')::tsquery AS q)"
    rows = table.db.query(table.q(
        f"SELECT {_SELECT}, ts_rank(tsv, q) FROM {{}}, {query} AS terms WHERE q::text <> '' AND tsv @@ q AND ({cond}) "
        "ORDER BY ts_rank(tsv, q) DESC, chunk_id LIMIT %s"), (text, *params, top_k))
    return [{**dict(zip(ROW_COLUMNS, r[:-1], strict=True)), "score": float(r[-1])} for r in rows]


def hybrid(table: Table, vector, text: str, top_k: int, nprobes: int, refine_factor: int | None,
           where: tuple | None = None, candidates: int | None = None) -> list[dict]:
    """store.hybrid over this table: both legs, fused by reciprocal rank."""
    n = candidates or max(20, 4 * top_k)
    return fuse([nearest(table, vector, n, nprobes, refine_factor, where), keyword(table, text, n, where)], top_k)
