"""The stage's batch helpers (pure pyarrow): which rows stay, which get a copied vector."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raylab.rag import embedder
from raylab.rag.stage import _hash_in, _not_in, _with_vectors


def _batch() -> pa.Table:
    return pa.table({"chunk_id": ["a", "b", "c", "d"], "content_hash": ["h1", "h2", "h1", "h3"],
                     "text": ["x", "y", "x", "z"]})


def test_rows_already_in_the_table_are_left_out():
    assert _not_in(_batch(), frozenset({"b", "d"}))["chunk_id"].to_pylist() == ["a", "c"]
    assert _not_in(_batch(), frozenset())["chunk_id"].to_pylist() == ["a", "b", "c", "d"]


def test_rows_split_by_whether_their_text_was_embedded_before():
    seen = frozenset({"h1"})
    assert _hash_in(_batch(), seen, inside=True)["chunk_id"].to_pylist() == ["a", "c"]
    assert _hash_in(_batch(), seen, inside=False)["chunk_id"].to_pylist() == ["b", "d"]


def test_copied_vectors_follow_the_content_hash_not_the_row_order():
    vectors = pa.table({"content_hash": ["h3", "h1"],
                        "vector": embedder.vector_array(np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32))})
    out = _with_vectors(_hash_in(_batch(), frozenset({"h1", "h3"}), inside=True), vectors)
    assert out["chunk_id"].to_pylist() == ["a", "c", "d"]
    assert out["vector"].to_pylist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]


def test_documents_get_their_sources_org_and_acl(tmp_path):
    from raylab import config
    from raylab.rag.stage import _access, _with_body

    cfg = config.load_dict({"version": 1, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "preset:tiny-llama"},
                            "data": {"sources": [{"type": "text", "path": str(tmp_path / "a")},
                                                 {"type": "text", "path": str(tmp_path / "b"), "name": "hr", "org": "acme",
                                                  "acl": ["initech", "initech"]}]}})
    access = _access(cfg)
    assert access == {"source0": (None, []), "hr": ("acme", ["initech"])}
    docs = pa.table({"source": ["hr", "source0"], "record_id": ["1", "2"], "origin": ["b:1", "a:1"],
                     "text": ["pay scales", "public"], "messages": pa.array([None, None], pa.list_(pa.string()))})
    out = _with_body(docs, access)
    assert out["org"].to_pylist() == ["acme", None] and out["acl"].to_pylist() == [["initech"], []]
    assert out["body"].to_pylist() == ["pay scales", "public"]
