"""Soak test of the endpoint: 16 clients for 10 minutes of mixed traffic over 2 adapters.

Not a CI test (it runs 10 minutes); a benchmark whose JSON is committed. The protocol and the
goals below were written before the first run and are not changed after seeing results.

Setup
    - Base: benchmarks/common.py `small_llama` (4-layer Llama, hidden 256, byte-level
      vocabulary, random weights, seed 0). Two LoRA adapters on it (peft, r=8, all linear
      layers, random non-zero init with seeds 1 and 2, so the two differ from the base and
      from each other), registered as versions 1 and 2 of `bench-soak` (gates passed).
    - `raylab serve` in its own process on an embedded Ray: one Generator replica
      (autoscaling min = max = 1, so the same process is measured at start and end),
      serve.cpus_per_replica 2, max_batch_size 16, max_ongoing_requests 32,
      max_adapters_per_replica 4, no API keys (loopback).
Load
    - 16 client threads, closed loop (each sends its next request when the last one ends),
      for 600 s of wall clock after the warm-up.
    - Each request: adapter version 1 or 2 (uniform), streaming with probability 0.5, a
      distinct prompt (a request counter in it) of 16 to 256 tokens (uniform; byte-level, so
      characters), max_tokens uniform in 16..128, temperature 0.7, `/v1/completions`.
      Random choices come from a seeded generator per client (seed = client index).
    - Warm-up (excluded): each adapter once, streaming and not, then 60 s of the same load
      (so the batch shapes, KV caches and allocator pools have been reached) before the
      clock starts. Set after a 30-s development run (the script at 17974a9) showed the
      Generator's RSS up 18 % within 30 s of a 4-request warm-up, before any measured run.
Recorded
    - Every request's outcome: HTTP status (or the exception type), streamed or not, latency
      from send to last byte, tokens received. A request is an error when the status is not
      200, an exception is raised, a stream does not end with `data: [DONE]` or carries an
      `error` event, or no token arrives. A client thread that dies fails the run.
    - Per minute (by request start): requests, errors, p50 and p99 latency.
    - RSS (and PSS where /proc allows) of each Serve replica process of this endpoint
      (Generator, Ingress) and of Serve's proxy, found by their process titles, right after
      the warm-up and right after the load ends; RSS also sampled every 30 s (the trend).
Goals (issue 21, item 3): 0 errors; each replica's RSS growth (end / start - 1) <= 10 %.

    python benchmarks/soak_serve.py                  # 10 minutes; writes results/soak_serve.json
    python benchmarks/soak_serve.py --minutes 1 --allow-dirty   # development: nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    git_commit,
    machine_facts,
    percentile,
    require_clean_commit,
    small_llama,
    wait_healthy,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
NAME, PORT, CLIENTS = "bench-soak", 8340, 16
WORDS = "the widget order ships from north warehouse on monday with invoice and tracking number".split()


def adapters(base: Path, root: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        path = root / f"adapter{seed}"
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
        out.append(path)
    return out


def register(root: Path, base: Path) -> Path:
    from raylab import config, registry

    cfg_path = root / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "version": 1, "output_dir": str(root / "run"), "data": {"sources": [{"type": "jsonl", "path": str(root / "x.jsonl")}]},
        "model": {"name_or_path": str(base)}, "registry": {"model_name": NAME},
        "serve": {"port": PORT, "cpus_per_replica": 2, "max_ongoing_requests": 32, "max_batch_size": 16,
                  "max_adapters_per_replica": 4, "max_prompt_tokens": 512, "max_tokens": 256,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16}}}))
    cfg = config.load(str(cfg_path))
    store = registry.open_store(cfg)
    exp = registry.experiment_id(store, NAME)
    meta = {"identity": "soak", "base_model": str(base), "method": "lora", "metrics": {}}
    for i, path in enumerate(adapters(base, root), 1):
        run = registry.log_run(store, exp, name=f"adapter{i}", key=f"soak-{i}", params={}, history=[], artifacts={}, tags={})
        mv = registry.register(store, cfg, run, str(path), meta)
        registry.set_tags(store, NAME, int(mv.version), {"raylab.gates.status": "passed"})
    registry.promote(store, NAME, 1)
    return cfg_path


def one_request(url: str, body: dict) -> dict:
    """Send one request; its outcome, never an exception (an exception is an outcome)."""
    started = time.perf_counter()
    out = {"stream": body["stream"], "status": None, "error": None, "tokens": 0}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            out["status"] = r.status
            if body["stream"]:
                done = False
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        out["error"] = f"stream error event: {event['error'].get('message', '')[:200]}"
                        break
                    out["tokens"] += sum(1 for c in event.get("choices", []) if c.get("text"))
                if not done and out["error"] is None:
                    out["error"] = "stream ended without [DONE]"
            else:
                answer = json.loads(r.read())
                out["tokens"] = int(answer["usage"]["completion_tokens"])
        if out["error"] is None and out["tokens"] == 0:
            out["error"] = "no token received"
    except urllib.error.HTTPError as e:
        out["status"], out["error"] = e.code, f"HTTP {e.code}: {e.read()[:200]!r}"
    except Exception as e:  # a reset, a timeout, a bad body: recorded, never lost
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    out["latency_s"] = time.perf_counter() - started
    return out


def body_for(rng: random.Random, client: int, n: int) -> dict:
    length = rng.randint(16, 256)
    words = f"request {client}-{n}: " + " ".join(rng.choice(WORDS) for _ in range(length))
    return {"model": f"{NAME}/{rng.choice((1, 2))}", "prompt": words[:length], "max_tokens": rng.randint(16, 128),
            "temperature": 0.7, "stream": rng.random() < 0.5}


def load(url: str, seconds: float, t0: float, samples: list | None = None) -> tuple[list[dict], list[str]]:
    outcomes: list[dict] = []
    died: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        try:
            rng = random.Random(i)
            n = 0
            while time.monotonic() < stop_at:
                body = body_for(rng, i, n)
                start = time.monotonic()
                result = one_request(url, body) | {"client": i, "start_s": start - t0}
                with lock:
                    outcomes.append(result)
                n += 1
        except BaseException as e:  # a client that dies fails the run
            died.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    if samples is not None:  # the RSS trend, every 30 s while the load runs
        while time.monotonic() < stop_at:
            samples.append({"t_s": round(time.monotonic() - t0), **{k: v["rss"] for k, v in serve_processes().items()}})
            time.sleep(min(30.0, max(0.0, stop_at - time.monotonic())))
    for t in threads:
        t.join(seconds + 400)
        if t.is_alive():
            died.append(f"{t.name} still running 400 s after the load ended")
    return outcomes, died


def serve_processes() -> dict[str, dict]:
    """RSS and PSS (bytes) of this machine's Serve replica and proxy processes, by title."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if not title.startswith("ray::") or not any(k in title for k in ("ServeReplica", "ProxyActor")):
            continue
        try:
            mem = p.memory_full_info()
            # the title's method suffix (`.handle_request...`) changes while it works: key by actor and pid
            out[f"{title.split()[0].split('.')[0]} pid {p.pid}"] = {"rss": mem.rss, "pss": getattr(mem, "pss", None)}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def per_minute(outcomes: list[dict]) -> list[dict]:
    rows = []
    for minute in range(int(max((o["start_s"] for o in outcomes), default=0) // 60) + 1):
        these = [o for o in outcomes if minute * 60 <= o["start_s"] < (minute + 1) * 60]
        ok = [o["latency_s"] for o in these if o["error"] is None]
        rows.append({"minute": minute, "requests": len(these), "errors": sum(o["error"] is not None for o in these),
                     "p50_s": statistics.median(ok) if ok else None, "p99_s": percentile(ok, 0.99)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--allow-dirty", action="store_true", help="development: run on a dirty tree, write nothing")
    args = p.parse_args()
    commit = git_commit() if args.allow_dirty else require_clean_commit()
    root = Path(tempfile.mkdtemp(prefix="soak-serve-"))
    os.environ["RAYLAB_HOME"] = str(root / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    base = small_llama(root / "base")
    cfg = register(root, base)
    url = f"http://127.0.0.1:{PORT}"
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "raylab", "serve", str(cfg)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc)
        warm = [one_request(url, {"model": f"{NAME}/{v}", "prompt": "warm up", "max_tokens": 16, "stream": s})
                for v in (1, 2) for s in (False, True)]
        assert all(w["error"] is None for w in warm), f"warm-up failed: {warm}"
        warm_outcomes, warm_died = load(url, 60.0, time.monotonic())
        rss_start = serve_processes()
        t0 = time.monotonic()
        trend: list[dict] = []
        outcomes, died = load(url, args.minutes * 60, t0, trend)
        wall = time.monotonic() - t0
        rss_end = serve_processes()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    errors = [o for o in outcomes if o["error"] is not None]
    growth = {k: rss_end[k]["rss"] / v["rss"] - 1 for k, v in rss_start.items() if k in rss_end}
    ok = [o["latency_s"] for o in outcomes if o["error"] is None]
    record = {
        "name": "soak_serve", "commit": commit, "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine_facts(), "protocol": "benchmarks/soak_serve.py docstring", "clients": CLIENTS,
        "seconds": round(wall, 1), "requests": len(outcomes), "streamed": sum(o["stream"] for o in outcomes),
        "errors": len(errors), "error_examples": sorted({e["error"] for e in errors})[:10], "clients_died": died,
        "p50_s": statistics.median(ok) if ok else None, "p99_s": percentile(ok, 0.99),
        "per_minute": per_minute(outcomes), "rss_start": rss_start, "rss_end": rss_end,
        "rss_growth": growth, "rss_trend": trend,
        "warmup": {"seconds": 60, "requests": len(warm_outcomes), "errors": sum(o["error"] is not None for o in warm_outcomes),
                   "clients_died": warm_died}, "max_rss_growth": max(growth.values(), default=None),
        "replaced_processes": sorted(set(rss_start) ^ set(rss_end)),
        "goals": {"errors": "== 0", "rss_growth": "<= 0.10 per replica"},
        "met": {"errors": not errors and not died,
                "rss_growth": bool(growth) and max(growth.values()) <= 0.10 and set(rss_start) == set(rss_end)},
    }
    print(json.dumps(record, indent=2))
    if not args.allow_dirty:
        write_results("soak_serve", [record])


if __name__ == "__main__":
    main()
