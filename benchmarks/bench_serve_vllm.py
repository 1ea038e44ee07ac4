"""Serving engines (issue 23): raylab serve with the vLLM engine against a bare vLLM server of
the same model files, and raylab's own transformers engine against plain `model.generate`.

Protocol: benchmarks/README.md (version 1). Written, with its goals, before its first run.
The servers take turns, one up at a time; each repeat starts every arm once in this order
and runs its workloads, then stops it; 3 repeats (a repeat takes many minutes), so every
point has 3 pairs, percentiles also pooled over the repeats.

Model: bench_serve's (a 4-layer Llama, hidden 256, 8 heads of 32 (a head size vLLM's CPU
attention takes), byte-level vocabulary, random weights, printable-only output rows), as
registry version 1 (full), and 8 LoRA adapters (r=8, all linear layers, distinct random
weights) as versions 2-9. float32 everywhere; 2 CPU threads per server.

    A  raylab serve, serve.engine vllm (vLLM's CPU build, the installed one): one Generator
       replica (cpus_per_replica 2), vLLM settings kv_cache_gb 1, max_num_seqs 16,
       max_loras 8, max_lora_rank 8. Version 1 (a full model) gets its own engine without
       LoRA; the adapters share the base's engine with LoRA on (what raylab does).
    B  bare vLLM (`python -m vllm.entrypoints.openai.api_server`, the same installed
       vLLM) on the base's files, no LoRA: --dtype float32 --max-model-len 1024
       --max-num-seqs 16, VLLM_CPU_KVCACHE_SPACE=1, OMP threads 2.
    C  bare vLLM as B with --enable-lora --max-loras 8 --max-lora-rank 8 and the 8
       adapters as --lora-modules (the multi-LoRA baseline).
    D  raylab serve, serve.engine transformers, settings as bench_serve's raylab arm.
    E  benchmarks/hf_server.py: `model.generate` per request, streaming one event per token
       (bench_serve's baseline), 2 threads, at Ray's worker niceness like the replica.

Workloads (fixed before running; seeded): requests as bench_serve's (prompts of 16-512
tokens, 16-256 output tokens, greedy, ignore_eos, `POST /v1/completions`, streaming).
- closed loop at concurrency 1, 4 and 16 (A, B): that many clients, each sending its next
  request when the last one ended, 12 requests per client slot at 1 and 4 (12 and 48) and 4
  per client at 16 (64): TTFT and ITL p50/p99, output tokens/s over the whole loop;
- open loop, Poisson at 1 and 2 requests/s, 67 requests per rate (A, B): the same figures;
- multi-LoRA (A, C): 8 clients closed loop, 48 requests of 64-token prompts and 64 output
  tokens, each to an adapter drawn uniformly from the 8: output tokens/s;
- concurrency 1 (D, E): the closed loop at concurrency 1 (12 requests);
- warm-up after each start: 8 requests of the open-loop shape at concurrency 4 (own seed),
  not recorded; cold start: launch to the first streamed token, recorded.

Amendment 1 (stop 56, written before its run): raylab's vLLM engine now runs
serve.cpus_per_replica - 1 OpenMP threads on CPU (1 here; raylab/serve/vllm_engine.py
omp_threads). B keeps 2 as the protocol fixed. A sixth arm shows whether B's 2 threads
handicap the baseline:
    F  bare vLLM as B with OMP threads 1 (OMP_NUM_THREADS=1, nobind): closed loops at
       concurrency 1, 4 and 16 only, reported beside as `*_vs_bare_1_thread` points
       (A / F), without a goal. The goals stay A / B.

Goals (issue 23): at concurrency 16, raylab-vLLM / bare vLLM output tokens/s >= 0.95 and
p99 TTFT <= 1.10x; raylab's transformers engine / plain generate at concurrency 1 output
tokens/s >= 1.0. Everything else is reported side by side without a goal.

    make bench NAME=serve_vllm   (or: python benchmarks/bench_serve_vllm.py [--repeats 3])
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import (  # noqa: E402
    NAME,
    NICENESS,
    WORDS,
    Server,
    open_loop,
    plain,
    setup,
    stream,
    stream_stats,
    summary,
    workload,
)
from common import percentile, point, require_clean_commit, write_results  # noqa: E402

ADAPTERS = 8
CONCURRENCY = {1: 12, 4: 48, 16: 64}  # clients: requests
RATES = (1.0, 2.0)
PER_RATE = 67
THREADS = 2
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(THREADS), "VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ENV_1_THREAD = VLLM_ENV | {"OMP_NUM_THREADS": "1"}  # arm F (amendment 1)
RAYLAB_VLLM = {"engine": "vllm", "max_batch_size": 16,
               "vllm": {"kv_cache_gb": 1, "max_num_seqs": 16, "max_loras": ADAPTERS, "max_lora_rank": 8}}


def closed_loop(url: str, model: str, clients: int, requests: list[dict]) -> tuple[list[dict], float]:
    """`clients` threads taking the next request as soon as their last one ended."""
    queue, start = list(requests), time.perf_counter()

    def client() -> list[dict]:
        done = []
        while True:
            try:
                req = queue.pop(0)
            except IndexError:
                return done
            done.append(stream(url, model, req))

    with ThreadPoolExecutor(clients) as pool:
        results = [r for part in pool.map(lambda _: client(), range(clients)) for r in part]
    return results, time.perf_counter() - start


def lora_mix(url: str, repeat: int) -> dict:
    rng = random.Random(5000 + repeat)
    reqs = [{"prompt": (f"adapter traffic {repeat}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(12)))[:64],
             "max_tokens": 64, "model": f"{NAME}/{2 + rng.randrange(ADAPTERS)}"} for i in range(48)]
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda r: plain(url, r["model"], r), reqs))
    return {"tokens_per_s": sum(d["tokens"] for d in done) / (time.perf_counter() - start),
            "failed": sum(d["status"] != 200 for d in done)}


def measure(server: Server, repeat: int, workloads: set[str]) -> dict:
    out = {"cold_start_s": server.first_token_s}
    with ThreadPoolExecutor(4) as pool:  # warm-up, not recorded
        list(pool.map(lambda req: stream(server.url, server.model, req), workload(9100 + repeat, 8, None)))
    for clients, n in CONCURRENCY.items():
        if f"c{clients}" in workloads:
            results, wall = closed_loop(server.url, server.model, clients, workload(7000 + 10 * repeat + clients, n, None))
            out[f"c{clients}"] = stream_stats(results, wall)
            print(f"  {server.label} r{repeat} c{clients}: {out[f'c{clients}']['tokens_per_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
    if "open" in workloads:
        for rate in RATES:
            results, wall = open_loop(server.url, server.model, workload(8000 + 10 * repeat + int(rate * 10), PER_RATE,
                                                                           rate), stream)
            out[f"open_{rate}"] = stream_stats(results, wall)
    if "lora" in workloads:
        out["lora_8"] = lora_mix(server.url, repeat)
    return out


def vllm_cmd(base: Path, port: int, lora: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--served-model-name", NAME,
           "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "16"]
    if lora:
        cmd += ["--enable-lora", "--max-loras", str(ADAPTERS), "--max-lora-rank", "8", "--lora-modules",
                *[f"{NAME}/{2 + k}={base.parent / f'adapter{k}'}" for k in range(ADAPTERS)]]
    return cmd


def records_from(runs: dict[str, list[dict]]) -> list[dict]:
    common = {"warmup": True, "repeats": len(runs["raylab_vllm"]), "threads": THREADS}
    names = {"raylab_vllm": "raylab serve (vLLM engine)", "vllm": "bare vLLM", "vllm_lora": "bare vLLM with LoRA",
             "raylab_transformers": "raylab serve (transformers engine)", "hf_server": "plain transformers generate",
             "vllm_1thread": "bare vLLM, 1 OpenMP thread"}
    out = []

    def pair(a: str, b: str, key: str, metric):
        return (names[a], [metric(r[key]) for r in runs[a]]), (names[b], [metric(r[key]) for r in runs[b]])

    def pooled(side: str, key: str, field: str) -> dict:
        values = [v for r in runs[side] for v in r[key][field]]
        return {"n": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}

    for key in [f"c{c}" for c in CONCURRENCY] + [f"open_{r}" for r in RATES]:
        goal16 = key == "c16"
        out.append(point(f"serve_vllm_tokens_per_s_{key}", "output tokens/s",
                         *pair("raylab_vllm", "vllm", key, lambda w: w["tokens_per_s"]),
                         goal=">= 0.95" if goal16 else None, goal_ratio=0.95 if goal16 else None,
                         failed={s: sum(r[key]["failed"] for r in runs[s]) for s in ("raylab_vllm", "vllm")}, **common))
        for field in ("ttft", "itl"):
            for q in (0.5, 0.99):
                goal = goal16 and field == "ttft" and q == 0.99
                out.append(point(f"serve_vllm_{field}_p{int(q * 100)}_{key}", "s",
                                 *pair("raylab_vllm", "vllm", key, lambda w, f=field, q=q: percentile(w[f], q)),
                                 higher_is_better=False, goal="<= 1.10" if goal else None, goal_ratio=1.10 if goal else None,
                                 pooled={s: pooled(s, key, field) for s in ("raylab_vllm", "vllm")}, **common))
    for key in (f"c{c}" for c in CONCURRENCY):  # amendment 1: against bare vLLM on 1 thread, no goal
        out.append(point(f"serve_vllm_tokens_per_s_{key}_vs_bare_1_thread", "output tokens/s",
                         *pair("raylab_vllm", "vllm_1thread", key, lambda w: w["tokens_per_s"]), **common))
        out.append(point(f"serve_vllm_ttft_p99_{key}_vs_bare_1_thread", "s",
                         *pair("raylab_vllm", "vllm_1thread", key, lambda w: percentile(w["ttft"], 0.99)),
                         higher_is_better=False, **common))
    out.append(point("serve_vllm_multi_lora_8_adapters", "output tokens/s",
                     *pair("raylab_vllm", "vllm_lora", "lora_8", lambda w: w["tokens_per_s"]), **common))
    out.append(point("serve_vllm_cold_start_s", "s (launch to first token)",
                     (names["raylab_vllm"], [r["cold_start_s"] for r in runs["raylab_vllm"]]),
                     (names["vllm"], [r["cold_start_s"] for r in runs["vllm"]]), higher_is_better=False, **common))
    out.append(point("serve_transformers_engine_tokens_per_s_c1", "output tokens/s",
                     *pair("raylab_transformers", "hf_server", "c1", lambda w: w["tokens_per_s"]),
                     goal=">= 1.0", goal_ratio=1.0, **common))
    return out


def main() -> None:
    import vllm

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    commit = require_clean_commit()
    root = Path(tempfile.mkdtemp(prefix="bench-serve-vllm-"))
    os.environ["RAYLAB_HOME"] = str(root / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    base, cfg = setup(root, adapters=ADAPTERS, serve=RAYLAB_VLLM)
    transformers_cfg = root / "serve-transformers.yaml"
    transformers_cfg.write_text(cfg.read_text().replace("engine: vllm", "engine: transformers"))
    url = "http://127.0.0.1:8310"
    arms = {  # label: (start, workloads)
        "raylab_vllm": (lambda: Server("raylab_vllm", [sys.executable, "-m", "raylab", "serve", str(cfg)], url, NAME),
                        {"c1", "c4", "c16", "open", "lora"}),
        "vllm": (lambda: Server("vllm", vllm_cmd(base, 8330, lora=False), "http://127.0.0.1:8330", NAME, health="/health",
                                env=VLLM_ENV, nice=NICENESS), {"c1", "c4", "c16", "open"}),
        "vllm_lora": (lambda: Server("vllm_lora", vllm_cmd(base, 8331, lora=True), "http://127.0.0.1:8331", NAME,
                                     health="/health", env=VLLM_ENV, nice=NICENESS), {"lora"}),
        "vllm_1thread": (lambda: Server("vllm_1thread", vllm_cmd(base, 8332, lora=False), "http://127.0.0.1:8332", NAME,
                                        health="/health", env=VLLM_ENV_1_THREAD, nice=NICENESS), {"c1", "c4", "c16"}),
        "raylab_transformers": (lambda: Server("raylab_transformers", [sys.executable, "-m", "raylab", "serve",
                                                                        str(transformers_cfg)], url, NAME), {"c1"}),
        "hf_server": (lambda: Server("hf_server", [sys.executable, "benchmarks/hf_server.py", str(base), "--port", "8320",
                                                    "--threads", str(THREADS)], "http://127.0.0.1:8320", NAME,
                                     nice=NICENESS), {"c1"}),
    }
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    for repeat in range(args.repeats):
        for label, (start, workloads) in arms.items():
            server = start()
            try:
                runs[label].append(measure(server, repeat, workloads))
            finally:
                server.stop()
    shutil.rmtree(root, ignore_errors=True)
    records = records_from(runs)
    for r in records:
        r["vllm_version"] = vllm.__version__
    records.append({"name": "serve_vllm_runs", "commit": commit, "protocol": 1, "amendment": 1, "vllm_version": vllm.__version__,
                    "summary": {k: [summary(r) for r in v] for k, v in runs.items()}})
    write_results("serve_vllm", records)


if __name__ == "__main__":
    main()
