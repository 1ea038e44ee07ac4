"""Tokenize-and-pack throughput and peak memory: raylab's data stage vs Hugging Face datasets.

Both sides do the same work on the same documents with the same functions
(raylab.data.packing.encode_batch / pack_batch, the tiny preset's tokenizer):
    raylab    ray.data.read_parquet -> data.tokenize (actor pool, 2 actors) -> data.pack
              -> write_parquet, on an embedded Ray
    baseline  datasets.Dataset.from_parquet -> map(tokenize, num_proc=2) -> map(pack,
              num_proc=2) -> to_parquet
at two corpus sizes 10x apart. Throughput is real tokens written per second of wall time.
Peak memory is sampled every 0.2 s: for raylab the summed RSS of every Ray process on the
node plus the driver; for the baseline the driver plus its worker processes.

    pip install -e ".[bench]" && python benchmarks/bench_data.py [--small 20000]

Targets (issue 3): throughput ratio >= 1.0 at the larger size; raylab's peak memory at 10x
the corpus <= 1.5x its peak at the smaller size.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measurement, write_results  # noqa: E402

from raylab import config  # noqa: E402
from raylab.core import cluster  # noqa: E402
from raylab.data import packing, stage  # noqa: E402
from raylab.models import load_tokenizer  # noqa: E402

SEQ_LEN = 512
WORDS = ("acme anvil rocket spring warranty order refund invoice portal badge vacation payday "
         "engineer laptop memory shipping express canteen parking onboarding expenses receipt").split()


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    """n documents: 70% completion text, 30% two-turn chats, 10-55 words (< SEQ_LEN tokens)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 55)))
        if i % 10 < 3:
            messages = json.dumps([{"role": "user", "content": text[:80] + "?"},
                                   {"role": "assistant", "content": text[80:] or "Yes."}])
            rows.append({"source": "bench", "record_id": f"doc:{i}", "raw": "", "format": "chat", "text": "", "messages": messages})
        else:
            rows.append({"source": "bench", "record_id": f"doc:{i}", "raw": "", "format": "completion", "text": text, "messages": ""})
    path.mkdir(parents=True, exist_ok=True)
    for k in range(0, n, 5000):  # several files, as a real corpus would be
        pq.write_table(pa.Table.from_pylist(rows[k:k + 5000]), path / f"part-{k // 5000:05d}.parquet")


class PeakRss:
    """Samples the summed RSS of a set of processes in a background thread."""

    def __init__(self, processes):
        self.processes, self.peak, self._stop = processes, 0, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for p in self.processes():
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def ray_processes():
    me = psutil.Process()
    out = [me]
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.pid != me.pid and ("ray::" in cmd or "/ray/" in cmd or p.info["name"] in ("raylet", "gcs_server")):
            out.append(p)
    return out


def own_processes():
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def run_raylab(cfg, corpus: Path, out: Path, pad_id: int) -> int:
    import ray

    docs = ray.data.read_parquet(str(corpus), num_cpus=cfg.data.cpus_per_task).select_columns(stage.DOC_COLUMNS)
    stage.pack(stage.tokenize(docs, cfg.data, cfg.model), cfg.data, pad_id).write_parquet(str(out), compression="zstd")
    return int(pq.read_table(out, columns=["num_tokens"])["num_tokens"].to_numpy().sum())


_TOK = {}


def _hf_tokenize(batch, model_cfg):
    if "tok" not in _TOK:  # once per worker process, like raylab's actors
        _TOK["tok"] = load_tokenizer(config.ModelConfig(**model_cfg))
    encoded = packing.encode_batch(_TOK["tok"], batch["text"], batch["messages"], False)
    return {"input_ids": [e[0] for e in encoded], "labels": [e[1] for e in encoded]}


def _hf_pack(batch, pad_id):
    table = pa.table({"input_ids": pa.array(batch["input_ids"], pa.list_(pa.int32())),
                      "labels": pa.array(batch["labels"], pa.list_(pa.int32()))})
    return packing.pack_batch(table, SEQ_LEN, pad_id, "pack").to_pydict()


def run_hf(model_cfg: dict, corpus: Path, out: Path, pad_id: int, cache: Path) -> int:
    import datasets

    ds = datasets.Dataset.from_parquet(str(corpus / "*.parquet"), cache_dir=str(cache))
    tok = ds.map(_hf_tokenize, batched=True, batch_size=256, num_proc=2, remove_columns=ds.column_names,
                 fn_kwargs={"model_cfg": model_cfg})
    packed = tok.map(_hf_pack, batched=True, batch_size=1024, num_proc=2, remove_columns=tok.column_names,
                     fn_kwargs={"pad_id": pad_id})
    packed.to_parquet(str(out))
    return int(sum(packed["num_tokens"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=20_000, help="documents in the smaller corpus")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="raylab-bench-data-"))
    cfg = config.load_dict({
        "version": 1, "output_dir": str(work / "run"), "model": {"name_or_path": "preset:tiny-llama"},
        "data": {"sources": [{"type": "parquet", "path": str(work)}], "max_seq_len": SEQ_LEN, "tokenizer_actors": 2},
    })
    pad_id = load_tokenizer(cfg.model).pad_token_id
    cluster.connect(cfg)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    records, peaks = [], {}
    try:
        for n in (args.small, args.small * 10):
            corpus = work / f"corpus-{n}"
            make_corpus(corpus, n)
            results = {}
            for side in ("baseline", "raylab"):  # baseline first: it warms the OS file cache for both
                out = work / f"out-{side}-{n}"
                start = time.perf_counter()
                with PeakRss(ray_processes if side == "raylab" else own_processes) as rss:
                    if side == "raylab":
                        tokens = run_raylab(cfg, corpus, out, pad_id)
                    else:
                        tokens = run_hf(cfg.model.model_dump(), corpus, out, pad_id, work / f"hf-cache-{n}")
                seconds = time.perf_counter() - start
                results[side] = (tokens / seconds, rss.peak / 2**20, tokens, seconds)
                print(f"{side:>8} n={n}: {tokens} tokens in {seconds:.1f} s, peak RSS {rss.peak / 2**20:.0f} MiB", file=sys.stderr)
            (ours, ours_mem, tokens, secs), (base, base_mem, btokens, bsecs) = results["raylab"], results["baseline"]
            assert tokens == btokens, f"the two sides packed different token counts: {tokens} vs {btokens}"
            peaks[n] = ours_mem
            records.append(measurement(
                f"tokenize_pack_throughput_{n}_docs", ours, "tokens/s", "datasets.map(num_proc=2)", base,
                tokens=tokens, seconds=secs, baseline_seconds=bsecs,
            ))
            records.append(measurement(
                f"tokenize_pack_peak_rss_{n}_docs", ours_mem, "MiB", "datasets.map(num_proc=2) peak RSS", base_mem,
            ))
        small, large = args.small, args.small * 10
        records.append(measurement(
            "raylab_peak_rss_growth_10x_corpus", peaks[large], "MiB", f"raylab peak RSS at {small} docs", peaks[small],
            target="<= 1.5",
        ))
        write_results("data", records)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
