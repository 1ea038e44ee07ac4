"""The LanceDB store without Ray: IVF-PQ only at or above ann.min_rows, exact search below,
deletes by id, and vectors copied by content hash."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raylab.config import AnnConfig
from raylab.rag import embedder, store

pytest.importorskip("lancedb")
DIMS = 16


def _rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"c{i}" for i in range(n)]
    return pa.table({"chunk_id": ids, "content_hash": [f"h{i}" for i in range(n)], "source": ["s"] * n,
                     "origin": [f"/docs/{i % 7}.md" for i in range(n)], "record_id": [f"{i % 7}.md" for i in range(n)],
                     "start": [0] * n, "end": [5] * n, "text": [f"text {i}" for i in range(n)],
                     "vector": embedder.vector_array(vectors)})


def test_ivf_pq_is_built_at_the_threshold_and_dropped_below(tmp_path):
    rows = _rows(600)
    table = store.connect(str(tmp_path)).create_table("chunks", data=rows)
    small = store.ann_index(table, AnnConfig(min_rows=601), DIMS, changed=True)
    assert small["built"] is False and not table.list_indices()
    built = store.ann_index(table, AnnConfig(min_rows=600, num_partitions=4, num_sub_vectors=4), DIMS, changed=True)
    assert built["built"] is True and table.list_indices()
    # with refine_factor the exact distance re-ranks the PQ candidates: a stored vector finds itself
    query = np.asarray(rows["vector"][123].as_py(), dtype=np.float32)
    hit = store.nearest(table, query, top_k=3, nprobes=4, refine_factor=10)[0]
    assert hit["chunk_id"] == "c123" and hit["score"] == pytest.approx(1.0, abs=1e-4)
    store.delete(table, [f"c{i}" for i in range(100)])
    assert table.count_rows() == 500
    again = store.ann_index(table, AnnConfig(min_rows=600), DIMS, changed=True)
    assert again["built"] is False and not table.list_indices(), "below the threshold the search is exact again"


def test_exact_search_ranks_by_cosine_and_vectors_are_found_by_hash(tmp_path):
    rows = _rows(50, seed=1)
    table = store.connect(str(tmp_path)).create_table("chunks", data=rows)
    query = np.asarray(rows["vector"][7].as_py(), dtype=np.float32)
    hits = store.nearest(table, query, top_k=5, nprobes=1, refine_factor=None)
    assert hits[0]["chunk_id"] == "c7" and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    found = store.vectors_for(table, ["h3", "h9", "h-absent"])
    assert sorted(found["content_hash"].to_pylist()) == ["h3", "h9"]
    assert store.ids(table).num_rows == 50 and store.vector_dimensions(table) == DIMS


def test_num_sub_vectors_must_divide_the_dimension(tmp_path):
    from raylab.errors import UserError

    table = store.connect(str(tmp_path)).create_table("chunks", data=_rows(20))
    with pytest.raises(UserError, match=r"index\.ann\.num_sub_vectors=5 must divide the embedding dimension 16"):
        store.ann_index(table, AnnConfig(min_rows=10, num_sub_vectors=5), DIMS, changed=True)
