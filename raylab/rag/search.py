"""Retrieval over an index `raylab index` built: the query embedded with the index's own model.

    from raylab.rag import search
    hits = search("runs/quickstart/index", "how do I reset my password?", top_k=4)
    hits[0]["text"], hits[0]["origin"], hits[0]["score"]     # best first; score = cosine similarity
    search(index_dir, "error E-4417", mode="hybrid")   # + keyword (BM25) ranking, fused by rank
    search(index_dir, "question", org="acme")          # only chunks org acme may read
    chunks = index_chunks("runs/quickstart/index", org="acme")   # every chunk acme may read, by chunk_id

Each hit: chunk_id, source, origin (the document's path, URL or key), record_id, start and
end (the chunk's character span in its document), text, score. The model comes from the
index's manifest, so a query can never be embedded by another model than its chunks were.

mode "vector" ranks by cosine similarity; "hybrid" (an index built with index.hybrid) fuses it
with a BM25 keyword ranking by reciprocal rank fusion (store.py says why by rank), and score is
then the fused score. `org` is the caller's organisation: a search only sees chunks with no org,
of that org, or whose ACL names it; None (single-tenant mode) sees only chunks with no org.
"""

from __future__ import annotations

from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.rag import embedder, stores

MODES = ("vector", "hybrid")


def open_index(index_dir: str):
    """(manifest, table: LanceDB's, or a pgstore.Table with index.store: pgvector) of a built index, or exit 2 naming what is missing."""
    if not storage.exists(index_dir):
        raise UserError(f"index directory {index_dir} does not exist; build it with `raylab index CONFIG` "
                        "(index.directory says where)")
    location = runs.index_manifest(index_dir)
    if not storage.exists(location):
        raise UserError(f"{index_dir} is not an index raylab built (no {runs.INDEX_MANIFEST}); build it with "
                        "`raylab index CONFIG`")
    manifest = runs.read_json(location, runs.IndexManifest)
    st = stores.backend(manifest.store)
    table = st.open_table(stores.connect(manifest.store, index_dir, manifest.database), manifest.table)
    if table is None or table.count_rows() == 0:
        where = "" if manifest.store == "lancedb" else " in index.database"
        raise UserError(f"the index at {index_dir} has no chunks (table {manifest.table!r}{where}); re-run `raylab "
                        "index CONFIG` on sources with accepted documents")
    if not st.has_access_columns(table):
        raise UserError(f"the index at {index_dir} was built before chunks carried org/acl columns; re-run `raylab "
                        "index CONFIG` into a new index.directory")
    return manifest, table


def ranked(table, vector, query: str, top_k: int, nprobes: int, refine_factor: int | None, mode: str,
           org: str | None) -> list[dict]:
    """The top_k rows of an opened table for `query` (embedded as `vector`), by `mode`, that
    `org` may read."""
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    st = stores.of(table)
    where = st.access_filter(org)
    if mode == "vector":
        return st.nearest(table, vector, top_k, nprobes, refine_factor, where)
    if mode != "hybrid":
        raise UserError(f"search mode {mode!r} is not one of {', '.join(MODES)}")
    if not st.has_full_text(table):
        raise UserError("hybrid search needs the index's full-text index, which this index has not: re-run `raylab "
                        "index CONFIG` with index.hybrid: true (the default)")
    return st.hybrid(table, vector, query, top_k, nprobes, refine_factor, where)


def search(index_dir: str, query: str, top_k: int = 4, nprobes: int = 20, refine_factor: int | None = None,
           mode: str = "vector", org: str | None = None) -> list[dict]:
    """The top_k chunks `org` may read that best match `query`, best first (exact below the
    ANN threshold)."""
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    manifest, table = open_index(index_dir)
    _, path = embedder.resolve(manifest.model)
    vector = embedder.encode(path, [query])[0]
    return ranked(table, vector, query, top_k, nprobes, refine_factor, mode, org)


def index_chunks(index_dir: str, org: str | None = None) -> list[dict]:
    """Every chunk of a built index that `org` may read (chunk_id, source, origin, record_id,
    start, end, text), sorted by chunk_id: what `raylab synth`'s grounded_qa asks questions
    about. The search's access rule: org None reads only chunks without an org."""
    _, table = open_index(index_dir)
    rows = stores.all_rows(table, stores.of(table).access_filter(org))
    return sorted(rows, key=lambda r: r["chunk_id"])


class Index:
    """An index opened once, with its embedder loaded once: what a serving replica holds.

        ix = Index("runs/quickstart/index")
        ix.search("how do I reset my password?", top_k=4)      # as search(), without re-opening
        ix.search("error E-4417", 4, mode="hybrid", org="acme")
        ix.embed(["a text", "another"])                        # (n, dimensions) float32, L2-normalised
        ix.tokens(["a text"])                                  # [n tokens of the embedder, specials included]
    """

    def __init__(self, index_dir: str, nprobes: int = 20, refine_factor: int | None = None):
        self.manifest, self.table = open_index(index_dir)
        self.name, self.path = embedder.resolve(self.manifest.model)
        self.model = embedder.load(self.path, "cpu")
        self.nprobes, self.refine_factor = nprobes, refine_factor

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    def embed(self, texts: list[str]):
        return embedder.encode(self.path, texts)

    def tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.model.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    @property
    def full_text(self) -> bool:
        return stores.of(self.table).has_full_text(self.table)

    def search(self, query: str, top_k: int, mode: str = "vector", org: str | None = None) -> list[dict]:
        return ranked(self.table, self.embed([query])[0], query, top_k, self.nprobes, self.refine_factor, mode, org)
