"""Shared helpers for benchmarks: the protocol in benchmarks/README.md.

Each benchmark measures raylab (A) and a named baseline (B) on the same work in one run,
alternating A and B (`alternate`), and writes one JSON point per measurement (`point`) to
benchmarks/results/<name>.json. What compares across machines is the ratio, never the
absolute time (machines here are shared and noisy). Benchmarks run from the repository root:

    python benchmarks/bench_connect.py        (or: make bench NAME=connect)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_facts() -> dict:
    facts = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        import ray

        facts["ray"] = ray.__version__
    except ImportError:
        pass
    return facts


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_RUN_COMMIT: list[str] = []  # the clean commit this run started from (require_clean_commit)


def require_clean_commit() -> str:
    """The commit to record; refuses a dirty tree (figures must come from a committed state).
    Points record this commit, taken at the start, not the tree's state when they are written."""
    commit = git_commit()
    if commit.endswith("-dirty") or commit == "unknown":
        raise SystemExit(f"benchmarks: the tree is not a clean commit ({commit}); commit first (results record it)")
    _RUN_COMMIT[:] = [commit]
    return commit


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile by nearest rank over the sorted values (None for no values)."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def wait_healthy(url: str, proc: subprocess.Popen, health: str = "/healthz", timeout_s: float = 900) -> None:
    """Until `url + health` answers, failing at once if the server process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + health, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout_s}s")


def timed(fn: Callable[[], object], repeat: int = 3, warmup: int = 0) -> dict:
    """Median and spread of `repeat` wall-clock timings of fn(), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


PROTOCOL = 1  # benchmarks/README.md, "Protocol (version 1)"


def quartiles(values: list[float]) -> dict:
    """Median and interquartile range (inclusive method) of the samples, all kept."""
    values = [float(v) for v in values]
    if len(values) == 1:
        q1 = median = q3 = values[0]
    else:
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "n": len(values), "samples": values}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def alternate(a: Callable[[], float], b: Callable[[], float], repeats: int, warmup: bool = True) -> dict:
    """Samples of a() and b() taken A, B, A, B, ... (protocol items 2-4): one untimed call of
    each first when `warmup`; each call returns its own sample (it times what it measures).
    Returns {"a": [...], "b": [...], "load": [[load before a, load before b], ...]}."""
    if warmup:
        a()
        b()
    out = {"a": [], "b": [], "load": []}
    for i in range(repeats):
        load = [load_average()]
        out["a"].append(a())
        load.append(load_average())
        out["b"].append(b())
        out["load"].append(load)
        print(f"  pair {i + 1}/{repeats}: A {out['a'][-1]:.4g}  B {out['b'][-1]:.4g}  (load {load})", file=sys.stderr, flush=True)
    return out


def point(name: str, unit: str, a: tuple[str, list[float]], b: tuple[str, list[float]], *, goal: str | None = None,
          goal_ratio: float | None = None, higher_is_better: bool = True, warmup: bool, load: list | None = None,
          a_settings: dict | None = None, b_settings: dict | None = None, **extra) -> dict:
    """One JSON point under the protocol: each side's quartiles, the median and IQR of the
    per-pair ratios A_i / B_i, the ratio of medians, and whether `goal_ratio` was met
    (ratio >= goal when higher is better, <= otherwise)."""
    (a_name, a_samples), (b_name, b_samples) = a, b
    # a None sample is a measurement that produced nothing (kept, reported in `missing`)
    missing = sum(x is None or y is None for x, y in zip(a_samples, b_samples, strict=True))
    both = [(x, y) for x, y in zip(a_samples, b_samples, strict=True) if x is not None and y is not None]
    a_samples, b_samples = [x for x, _ in both], [y for _, y in both]
    if not both:
        raise ValueError(f"{name}: no pair of samples has both sides")
    pairs = [x / y for x, y in zip(a_samples, b_samples, strict=True) if y]
    ratios = quartiles(pairs)
    met = None
    if goal_ratio is not None:
        met = ratios["median"] >= goal_ratio if higher_is_better else ratios["median"] <= goal_ratio
    record = {
        "name": name, "unit": unit, "higher_is_better": higher_is_better,
        "a": {"name": a_name, **(a_settings or {}), **quartiles(a_samples)},
        "b": {"name": b_name, **(b_settings or {}), **quartiles(b_samples)},
        "ratio": ratios["median"], "ratio_q1": ratios["q1"], "ratio_q3": ratios["q3"], "pair_ratios": pairs,
        "ratio_of_medians": statistics.median(a_samples) / statistics.median(b_samples),
        "goal": goal, "met": met, "repeats": len(a_samples), "missing": missing, "warmup": warmup, "load": load,
        "commit": _RUN_COMMIT[0] if _RUN_COMMIT else git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_facts(), "protocol": PROTOCOL, **extra,
    }
    print(json.dumps({k: v for k, v in record.items() if k not in ("machine", "pair_ratios")}), flush=True)
    return record


def measurement(name: str, value: float, unit: str, baseline: str, baseline_value: float, **extra) -> dict:
    record = {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": value / baseline_value if baseline_value and value is not None else None,
        "machine": machine_facts(),
        "commit": git_commit(),
        **extra,
    }
    print(json.dumps(record), flush=True)
    return record


REPO = Path(__file__).resolve().parents[1]

# The Acme corpus as the benchmarks read it: a frozen copy of configs/quickstart.yaml's data
# section at protocol 1, so a change to the quickstart never changes a benchmark's problem.
ACME_DATA = {
    "sources": [
        {"type": "csv", "path": str(REPO / "examples/acme/faq.csv"), "name": "faq", "format": "instruction",
         "fields": {"prompt": "question", "response": "answer"}},
        {"type": "jsonl", "path": str(REPO / "examples/acme/support_chats.jsonl"), "name": "support", "format": "chat"},
        {"type": "text", "path": str(REPO / "examples/acme/handbook"), "name": "handbook"},
    ],
    "max_seq_len": 512, "val_fraction": 0.2, "seed": 0,
}


SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
# the tiny-llama preset's architecture at protocol 1 (raylab/models/presets.py then), frozen
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def small_llama(path: Path, dims: dict = SMALL) -> Path:
    """The benchmarks' model: a Llama with `dims` (default: 4 layers, hidden 256), a
    byte-level vocabulary with raylab's chat template, random weights (seed 0), saved with
    save_pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raylab.models import DEFAULT_CHAT_TEMPLATE, build_byte_tokenizer

    tok = build_byte_tokenizer()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE  # what the train stage gives a template-less tokenizer
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **dims)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_results(bench: str, records: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
