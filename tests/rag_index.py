"""A retrieval index as `raylab index` leaves it, written directly (no Ray Data): for the
serving tests, which test retrieval at serving time, not the index build (tests/integration/
test_rag.py builds indexes with `raylab index`)."""

from __future__ import annotations

import importlib.metadata
import re

import numpy as np

from raylab.rag import embedder


def write_index(directory, texts: list[str], model: str = embedder.DEFAULT_MODEL, orgs: list | None = None,
                acls: list | None = None, full_text: bool = False, vectors=None):
    """An index as `raylab index` leaves it (a LanceDB `chunks` table and raylab_index.json),
    one chunk per text, embedded by MiniLM; `model` is what the manifest records; `orgs` and
    `acls` each chunk's org and ACL (default none); `full_text`: with the BM25 index hybrid search needs;
    `vectors`: these (n, 384) instead of MiniLM's, for a test that never searches. Returns the table."""
    import lancedb
    import pyarrow as pa

    from raylab.core import runs

    if vectors is None:
        vectors = embedder.encode(embedder.resolve(None)[1], texts) if texts else np.zeros((0, 384), np.float32)
    n = len(texts)
    rows = pa.table({"chunk_id": [f"c{i}" for i in range(n)], "content_hash": [f"h{i}" for i in range(n)],
                     "source": ["packages"] * n, "origin": [f"packages.jsonl:{i + 1}" for i in range(n)],
                     "record_id": [f"r{i}" for i in range(n)], "start": [0] * n, "end": [len(t) for t in texts],
                     "text": texts, "org": pa.array(orgs or [None] * n, pa.string()),
                     "acl": pa.array(acls or [[] for _ in range(n)], pa.list_(pa.string())),
                     "vector": embedder.vector_array(vectors)})
    table = lancedb.connect(str(directory)).create_table("chunks", rows)
    if full_text:
        from raylab.rag import store

        store.full_text_index(table, changed=True)
    runs.write_json(runs.index_manifest(str(directory)), runs.IndexManifest(
        version=1, created="2026-01-01T00:00:00+00:00", table="chunks", model=model, dimensions=384,
        max_seq_length=256, chunk_tokens=200, overlap=32, metric="cosine", rows=n, counts={}, data={}, ann={},
        timings={}, full_text={"built": True} if full_text else None))
    return table


def package_description(dist) -> str:
    """An installed distribution's long description, whitespace collapsed. The metadata body
    (`get_payload`) until some library has been imported; then importlib.metadata's message
    adapter is in place and the same text is the `Description` header (seen in CI after
    ray/transformers/mlflow imports: every payload empty, every header there)."""
    text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
    return " ".join(text.split())


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def package_descriptions(n: int) -> list[str]:
    """n package descriptions of 600-3000 characters, in a fixed order (by package name)."""
    out, seen = [], set()
    for d in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        text = d.metadata.get_payload() or d.metadata.get("Description") or ""
        name = (d.metadata["Name"] or "").lower()
        if 600 <= len(text) <= 3000 and name not in seen and text not in out:
            seen.add(name)
            out.append(text)
    assert len(out) >= n, f"only {len(out)} installed packages have a description of 600-3000 characters"
    return out[:n]


def prose_sentences(text: str, wrapped: bool = False) -> list[str]:
    """The plain prose sentences of `text` (8-40 words; no links, addresses or markup), those
    of its second half first; `wrapped`: also those broken over lines, whitespace collapsed
    (then no longer verbatim in `text`)."""
    sentences = _SENTENCE.split(text)
    out = [s.strip() for s in sentences[len(sentences) // 2:] + sentences[: len(sentences) // 2]
           if 8 <= len(s.split()) <= 40 and not re.search(r"[@<>\[\]`|#*=]|http", s)]
    return [" ".join(s.split()) for s in out] if wrapped else [s for s in out if "\n" not in s]


def held_out_sentence(text: str) -> str | None:
    """A plain prose sentence from the second half of `text`, verbatim (see prose_sentences)."""
    return next(iter(prose_sentences(text)), None)
