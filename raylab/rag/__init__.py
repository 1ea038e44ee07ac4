"""Retrieval: `raylab index` builds a vector index of the company's documents; `search` reads it.

    from raylab.rag import run_index, search
    manifest = run_index(cfg)              # writes <index.directory>/ (default <output_dir>/index)
    hits = search(index_dir, "question", top_k=4)       # mode="hybrid": + BM25 keywords; org=: access
    chunks = index_chunks(index_dir, org)  # every chunk org may read (raylab synth's grounded_qa.index)
    ix = Index(index_dir); ix.search("question", 4); ix.embed(["text"])   # opened once (serving)
    text = render_prompt("question", hits)      # the retrieval prompt RAFT trains on
    report = run_rag_eval(cfg)             # index.eval questions -> <output_dir>/eval/rag.json

Modules: stage (the Ray Data pipeline, `run_index`), chunking (chunks in the embedder's
tokens, stable ids), embedder (the sentence-transformers model and its Ray Data actor), store
(LanceDB: parallel append, delete, IVF-PQ, the full-text index, hybrid search by
reciprocal rank fusion, the org/ACL filter), pgstore (the same over PostgreSQL + pgvector:
`index.store: pgvector`), stores (which of the two an index uses), search (queries), prompt (the retrieval prompt
format), raft (RAFT training examples: `raylab index --raft OUT.jsonl`), evaluate (recall@k, MRR,
faithfulness and latency on labelled questions: `raylab eval CONFIG --rag`). Needs the `rag` extra:
pip install 'raylab[rag]'.
"""

from __future__ import annotations

from raylab.rag.embedder import describe, peek
from raylab.rag.evaluate import eval_table, run_rag_eval
from raylab.rag.prompt import render as render_prompt
from raylab.rag.raft import run_raft
from raylab.rag.search import Index, index_chunks, open_index, search
from raylab.rag.stage import index_directory, run_index
from raylab.rag.store import readable
from raylab.rag.stores import has_full_text, vector_dimensions

__all__ = ["Index", "describe", "eval_table", "has_full_text", "index_chunks", "index_directory", "open_index", "peek", "readable",
           "render_prompt", "run_index", "run_raft",
           "run_rag_eval", "search", "vector_dimensions"]
