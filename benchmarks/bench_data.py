"""The data stage: the whole `raylab data` run at four corpus sizes (scaling, cold and warm),
and its tokenize + pack against Hugging Face `datasets.map`, with memory as PSS per side.

Protocol: benchmarks/README.md (version 1). Every sample is a fresh process, so each side
pays its own start; memory is the peak of the summed proportional set size (PSS) of that
process and all its descendants, sampled every 0.2 s (an embedded Ray's processes are the
driver's descendants; the baseline's process tree holds no Ray).

Problem (fixed before running): synthetic company documents made here from a fixed word
list, seeded: 70 % completion texts in `docs-*.jsonl` and 30 % two-turn chats in
`chats-*.jsonl` (10-55 words each), of which 3 % are exact duplicates of an earlier
document, 3 % near duplicates (one word changed), 2 % carry an e-mail address and 2 % a
phone number, 1 % are empty (quarantined). Model: the tiny-llama architecture with a
byte-level tokenizer (benchmarks/common.py `small_llama(TINY)`); max_seq_len 512, packed;
every data-stage default on (validation, PII redaction, exact and near dedup).

Points and goals:

1. `data_stage_s_per_doc_N` for N in 10k, 50k, 100k, 200k documents: `raylab data` in a fresh
   process, from process start to exit, divided by N. The first run at each size is reported
   apart as `cold` (the corpus never read before, a fresh RAYLAB_HOME); the warm samples
   follow (5 at 10k and 50k, 3 at 100k and 200k, whose runs take over a minute). No
   baseline: reported, no goal.
2. `data_stage_scaling_200k_vs_50k`: seconds per document at 200k (A) against 50k (B), warm,
   alternated A, B (3 pairs). Goal: <= 1.1 (linear scaling).
3. `tokenize_pack_vs_hf_N` for N in 20k and 200k: the same documents (already validated
   records, the stage's internal form) tokenized and packed by raylab (`data.stage.tokenize`
   -> `data.stage.pack` -> Parquet on an embedded Ray, `ray.init` done before the clock
   starts) against `datasets.Dataset.from_parquet -> map(tokenize, num_proc=cores) ->
   map(pack, num_proc=cores) -> to_parquet` (no Ray in its process); both use
   raylab.data.packing's functions; metric: real tokens written per second, from the start
   of the work to the output written. 5 pairs. Goal: >= 1.0 at 200k.
4. `tokenize_pack_pss_N`: the peak PSS of the samples of point 3 (A / B). Reported.
5. A py-spy profile of one warm 200k `raylab data` run (all processes) names the functions
   that dominate (`near-dedup` share said), saved as `profile` in the JSON.

    make bench NAME=data   (or: python benchmarks/bench_data.py [--sizes 10000,50000,100000,200000])
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TINY,
    alternate,
    machine_facts,
    point,
    quartiles,
    require_clean_commit,
    small_llama,
    write_results,
)

HERE = Path(__file__).resolve()
SEQ_LEN = 512
CORES = len(os.sched_getaffinity(0))
NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))  # what the raylet gives Ray workers
WORDS = ("acme anvil rocket spring warranty order refund invoice portal badge vacation payday "
         "engineer laptop memory shipping express canteen parking onboarding expenses receipt").split()


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    """n documents as the docstring says, in files of 5,000 lines."""
    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.03 and texts:
            text = rng.choice(texts)  # exact duplicate
        elif roll < 0.06 and texts:
            words = rng.choice(texts).split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            text = " ".join(words)  # near duplicate
        elif roll < 0.07:
            text = ""  # empty: quarantined
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 55)))
            if roll < 0.09:
                text += f" write to user{i}@example.com"
            elif roll < 0.11:
                text += f" call +1 415 555 {i % 10000:04d}"
        texts.append(text)
    path.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = collections.defaultdict(list)
    for i, text in enumerate(texts):
        if i % 10 < 3:
            record = {"messages": [{"role": "user", "content": text[:80] + "?"},
                                   {"role": "assistant", "content": text[80:] or "Yes."}]}
            files[f"chats-{i // 5000:05d}.jsonl"].append(json.dumps(record))
        else:
            files[f"docs-{i // 5000:05d}.jsonl"].append(json.dumps({"text": text}))
    for name, lines in files.items():
        (path / name).write_text("\n".join(lines) + "\n")


def job(corpus: Path, model: Path, out: Path) -> dict:
    return {"version": 1, "offline": True, "output_dir": str(out), "registry": {"enabled": False},
            "model": {"name_or_path": str(model)},
            "data": {"sources": [{"type": "jsonl", "path": str(corpus / "docs-*.jsonl"), "name": "docs", "format": "completion"},
                                 {"type": "jsonl", "path": str(corpus / "chats-*.jsonl"), "name": "chats", "format": "chat"}],
                     "max_seq_len": SEQ_LEN}}


class PeakPss:
    """The peak of the summed PSS of this process and its descendants, sampled every 0.2 s."""

    def __init__(self):
        import psutil

        self.me, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


# --- children: one sample each, in a fresh process -------------------------------------

def child_tokenize_pack(side: str, docs: Path, model: Path, out: Path, result: Path) -> None:
    import pyarrow.parquet as pq

    from raylab import config
    from raylab.models import load_tokenizer

    cfg = config.load_dict(job(docs, model, out.parent / "run"))
    pad_id = load_tokenizer(cfg.model).pad_token_id
    if side == "raylab":
        import ray

        from raylab.core import cluster
        from raylab.data import stage

        cluster.connect(cfg)
        ray.data.DataContext.get_current().enable_progress_bars = False
    with PeakPss() as pss:
        start = time.perf_counter()
        if side == "raylab":
            ds = ray.data.read_parquet(str(docs), num_cpus=cfg.data.cpus_per_task).select_columns(stage.DOC_COLUMNS)
            stage.pack(stage.tokenize(ds, cfg.data, cfg.model), cfg.data, pad_id).write_parquet(str(out), compression="zstd")
        else:
            hf_tokenize_pack(cfg.model.model_dump(), docs, out, pad_id)
        seconds = time.perf_counter() - start
    tokens = int(pq.read_table(out, columns=["num_tokens"])["num_tokens"].to_numpy().sum())
    result.write_text(json.dumps({"seconds": seconds, "tokens": tokens, "pss": pss.peak}))


_TOK = {}


def _hf_tokenize(batch, model_cfg):
    from raylab import config
    from raylab.data import packing
    from raylab.models import load_tokenizer

    if "tok" not in _TOK:  # once per worker process, like raylab's actors
        _TOK["tok"] = load_tokenizer(config.ModelConfig(**model_cfg))
    encoded = packing.encode_batch(_TOK["tok"], batch["text"], batch["messages"], False)
    return {"input_ids": [e[0] for e in encoded], "labels": [e[1] for e in encoded]}


def _hf_pack(batch, pad_id):
    import pyarrow as pa

    from raylab.data import packing

    table = pa.table({"input_ids": pa.array(batch["input_ids"], pa.list_(pa.int32())),
                      "labels": pa.array(batch["labels"], pa.list_(pa.int32()))})
    return packing.pack_batch(table, SEQ_LEN, pad_id, "pack").to_pydict()


def hf_tokenize_pack(model_cfg: dict, docs: Path, out: Path, pad_id: int) -> None:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_parquet(str(docs / "*.parquet"), cache_dir=str(out.parent / "hf-cache"))
    tok = ds.map(_hf_tokenize, batched=True, batch_size=256, num_proc=CORES, remove_columns=ds.column_names,
                 fn_kwargs={"model_cfg": model_cfg})
    packed = tok.map(_hf_pack, batched=True, batch_size=1024, num_proc=CORES, remove_columns=tok.column_names,
                     fn_kwargs={"pad_id": pad_id})
    out.mkdir(parents=True, exist_ok=True)
    packed.to_parquet(str(out / "part-00000.parquet"))


# --- the parent --------------------------------------------------------------------------

class Bench:
    def __init__(self, root: Path):
        self.root, self.n = root, 0
        self.model = small_llama(root / "model", TINY)

    def fresh(self) -> Path:
        self.n += 1
        return self.root / f"s{self.n}"

    def stage_s(self, corpus: Path, home: Path | None = None, profile: Path | None = None) -> float:
        """One `raylab data` run in a fresh process: seconds from process start to exit."""
        out = self.fresh()
        cfg = out.with_suffix(".yaml")
        cfg.write_text(json.dumps(job(corpus, self.model, out)))
        env = {**os.environ, "RAYLAB_HOME": str(home or self.root / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [sys.executable, "-m", "raylab", "data", str(cfg)]
        if profile:
            cmd = [shutil.which("py-spy") or "py-spy", "record", "--subprocesses", "--rate", "20", "--format", "raw",
                   "--output", str(profile), "--", *cmd]
        start = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.time() - start
        if proc.returncode:
            raise RuntimeError(f"raylab data exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    def tokenize_pack(self, side: str, docs: Path) -> dict:
        out = self.fresh()
        result = out.with_suffix(".json")
        # the baseline at the niceness Ray gives the workers doing raylab's side (protocol item 6)
        nice = (lambda: os.nice(NICENESS)) if side == "hf" else None
        subprocess.run([sys.executable, str(HERE), "--child", side, str(docs), str(self.model), str(out / "out"), str(result)],
                       check=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, preexec_fn=nice)
        shutil.rmtree(out, ignore_errors=True)
        return json.loads(result.read_text())


def records_form(corpus: Path, n: int, model: Path, root: Path) -> Path:
    """The corpus as the stage's internal document rows (DOC_COLUMNS), for point 3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / f"docs-{n}"
    path.mkdir()
    rows = []
    for f in sorted(corpus.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines()):
            r = json.loads(line)
            chat = "messages" in r
            rows.append({"source": f.stem, "record_id": f"{f.name}:{i}", "raw": "", "format": "chat" if chat else "completion",
                         "text": "" if chat else r["text"], "messages": json.dumps(r["messages"]) if chat else ""})
    rows = [r for r in rows if r["text"] or r["messages"]]
    for k in range(0, len(rows), 5000):
        pq.write_table(pa.Table.from_pylist(rows[k:k + 5000]), path / f"part-{k // 5000:05d}.parquet")
    return path


def profile_summary(raw: Path) -> dict:
    """py-spy raw samples -> the share of samples per innermost raylab/ray.data function."""
    leaf, total = collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        total += int(count)
        frames = stack.split(";")
        ours = [f for f in frames if "raylab/" in f]
        leaf[(ours[-1] if ours else frames[-1]).split(" (")[0]] += int(count)
    top = {name: round(n / total, 3) for name, n in leaf.most_common(15)}
    near = sum(n for name, n in leaf.items() if "signature" in name.lower() or "minhash" in name.lower() or "shingle" in name.lower())
    return {"samples": total, "top_innermost_raylab_function_share": top, "near_dedup_share": round(near / max(total, 1), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,50000,100000,200000")
    parser.add_argument("--tp-sizes", default="20000,200000")
    parser.add_argument("--child", nargs=5, metavar=("SIDE", "DOCS", "MODEL", "OUT", "RESULT"))
    args = parser.parse_args()
    if args.child:
        side, docs, model, out, result = args.child
        child_tokenize_pack(side, Path(docs), Path(model), Path(out), Path(result))
        return
    commit = require_clean_commit()
    sizes = [int(x) for x in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="raylab-bench-data-"))
    records: list[dict] = []
    try:
        bench = Bench(root)
        corpora = {}
        for n in sorted(set(sizes) | {int(x) for x in args.tp_sizes.split(",")}):
            corpora[n] = root / f"corpus-{n}"
            make_corpus(corpora[n], n)
        # 1. cold, then warm, per size
        per_doc = {}
        for n in sizes:
            cold = bench.stage_s(corpora[n], home=root / f"home-cold-{n}")
            warm = [bench.stage_s(corpora[n]) for _ in range(5 if n <= 50_000 else 3)]
            per_doc[n] = [s / n for s in warm]
            records.append({"name": f"data_stage_s_per_doc_{n}", "unit": "s per document", "cold": cold / n,
                            "warm": quartiles(per_doc[n]), "documents": n, "commit": commit, "protocol": 1,
                            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_facts()})
            print(json.dumps({k: v for k, v in records[-1].items() if k != "machine"}), flush=True)
        # 2. scaling, alternated
        if 50_000 in corpora and 200_000 in corpora:
            s = alternate(lambda: bench.stage_s(corpora[200_000]) / 200_000, lambda: bench.stage_s(corpora[50_000]) / 50_000,
                          3, warmup=False)
            records.append(point("data_stage_scaling_200k_vs_50k", "s per document", ("200k documents", s["a"]),
                                 ("50k documents", s["b"]), goal="<= 1.1", goal_ratio=1.1, higher_is_better=False,
                                 warmup=False, load=s["load"], note="warm: each size already ran in point 1"))
        # 3, 4. tokenize + pack against datasets.map
        for n in [int(x) for x in args.tp_sizes.split(",")]:
            docs = records_form(corpora[n], n, bench.model, root)
            runs = {"a": [], "b": []}

            def side(name: str, key: str, docs: Path = docs, runs: dict = runs) -> float:
                runs[key].append(bench.tokenize_pack(name, docs))
                return runs[key][-1]["tokens"] / runs[key][-1]["seconds"]

            s = alternate(lambda: side("raylab", "a"), lambda: side("hf", "b"), 5)
            if {r["tokens"] for r in runs["a"] + runs["b"]} != {runs["a"][0]["tokens"]}:
                raise SystemExit(f"the sides packed different token counts: {[r['tokens'] for r in runs['a'] + runs['b']]}")
            goal = n == 200_000
            records.append(point(f"tokenize_pack_vs_hf_{n}", "real tokens/s", ("raylab tokenize + pack", s["a"]),
                                 (f"datasets.map(num_proc={CORES})", s["b"]), goal=">= 1.0" if goal else None,
                                 goal_ratio=1.0 if goal else None, warmup=True, load=s["load"], threads=CORES,
                                 tokens=runs["a"][0]["tokens"], documents=n))
            records.append(point(f"tokenize_pack_pss_{n}", "MiB peak PSS", ("raylab (its own cluster)", [r["pss"] / 2**20 for r in runs["a"][1:]]),
                                 ("datasets.map (no Ray)", [r["pss"] / 2**20 for r in runs["b"][1:]]), higher_is_better=False,
                                 warmup=True, load=s["load"], documents=n))
        # 5. where the time goes in a warm 200k run
        if 200_000 in corpora and shutil.which("py-spy"):
            raw = root / "profile.txt"
            bench.stage_s(corpora[200_000], profile=raw)
            records.append({"name": "data_stage_profile_200k", "profile": profile_summary(raw), "commit": commit,
                            "protocol": 1, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            print(json.dumps(records[-1]), flush=True)
        write_results("data", records)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
