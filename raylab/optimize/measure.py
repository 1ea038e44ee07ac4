"""What `raylab optimize` measures of a result and of its parent (report.py records it):
size on disk, parameter count, peak memory at load, tokens/s at concurrency 1 and 16, and
held-out quality.

    from raylab.optimize import measure
    measure.disk_bytes("runs/q/train/final")                       # bytes of every file
    measure.peak_load_memory({"parent": p, "result": r})           # {"parent": {"peak_rss_bytes", "load_rss_bytes"}, ...}
    measure.speed(model, tok, cfg.optimize.measure)                # {"tokens_per_s_c1": ..., "tokens_per_s_c16": ...}
    measure.quality(cfg, path, model, tok, items)                  # {"eval_loss", "perplexity", "rouge_l", ...}

Peak memory is measured in a fresh Python process per model (both run at once): the process
imports torch and transformers, reads its peak resident set size, loads the model through
`models.load_inference` (the loader eval and serve use) and reads it again. Why a subprocess:
tracemalloc sees only Python's allocator, not the tensors torch allocates in C++, and a
process's peak RSS cannot be reset, so in this process (which has loaded other models) it
would say nothing about this one (in the fresh process, on Linux, the peak is reset to the
current resident set just before the load). `load_rss_bytes` is the rise during the load (the model's
weights plus whatever the load held transiently); `peak_rss_bytes` the process's whole peak.

Speed is a short local generation run on the loaded model (`model.generate`, greedy, KV
cache): `requests` fixed prompts, one at a time (concurrency 1) and in batches of 16
(concurrency 16, rounded up to whole batches, left-padded as the eval stage batches), every request generating exactly
`max_new_tokens` tokens so parent and result do the same work; one warm-up batch first. It
is not the Serve deployment's continuous batching (serve sits above this stage), but the same
model object and forward pass, so the ratio parent/result is what it measures. Timing is noise
in tests: no test decides on it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from raylab import evaluate, models
from raylab.config import MeasureConfig, RaylabConfig

CONCURRENCY = (1, 16)
# Fixed prompts (cycled to `requests`): the same token ids for parent and result, whatever the data.
PROMPTS = (
    "Summarise the main points of the quarterly report for the board.",
    "How do I reset my password if I no longer have access to my email?",
    "Write a short product description for a stainless steel water bottle.",
    "Explain the difference between a warranty and a guarantee.",
    "List three ways to reduce the cost of shipping small parcels.",
    "What should a new employee bring on the first day?",
    "Translate the phrase 'thank you for your order' into plain language for a child.",
    "Describe the steps to file an expense claim.",
)
# Run in a fresh interpreter: its resident set before loading one model and its peak after. On
# Linux the peak (VmHWM) is reset to the current RSS first (/proc/self/clear_refs "5"), so import
# transients do not hide the load; elsewhere the lifetime peak (ru_maxrss) before and after.
_PROBE = """
import json, resource, sys
import torch, transformers  # noqa: F401 - imported before the first reading, so only the load is counted
from raylab import models

def status(key):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None

def peak():
    return status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS") or peak()
except OSError:
    before = peak()
model, tok = models.load_inference(sys.argv[1])
after = peak()
print(json.dumps({"peak_rss_bytes": after, "load_rss_bytes": max(0, after - before)}))
"""


def disk_bytes(path: str) -> int:
    """Bytes of every file under a local model directory."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def parameter_count(model) -> int:
    """Parameters of the model as loaded (a quantised tensor counts its logical elements)."""
    return sum(p.numel() for p in model.parameters())


def _probe(path: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True, timeout=900,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"loading {path} in a fresh process failed: {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def peak_load_memory(paths: dict[str, str]) -> dict[str, dict]:
    """{label: {peak_rss_bytes, load_rss_bytes}} of each local model directory, each loaded in a
    fresh process (all at once: each reads only its own peak)."""
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        futures = {label: pool.submit(_probe, path) for label, path in paths.items()}
        return {label: f.result() for label, f in futures.items()}


def _prompts(tok, n: int) -> list[list[int]]:
    return [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(n)]


def _generate(model, tok, prompts: list[list[int]], new_tokens: int) -> int:
    """Generate exactly `new_tokens` tokens for each prompt (greedy); the tokens generated."""
    import torch

    ids, mask = models.left_pad(prompts, tok.pad_token_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, use_cache=True, temperature=None, top_p=None, top_k=None)
    return (out.shape[1] - ids.shape[1]) * len(prompts)


def tokens_per_s(model, tok, concurrency: int, requests: int, new_tokens: int) -> float:
    """Generated tokens per second over `requests` requests (rounded up to whole batches),
    `concurrency` at a time: every batch is `concurrency` requests wide."""
    prompts = _prompts(tok, math.ceil(requests / concurrency) * concurrency)
    batches = [prompts[i:i + concurrency] for i in range(0, len(prompts), concurrency)]
    _generate(model, tok, batches[0], new_tokens)  # warm-up: first-call allocations are not the model's speed
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        tokens += _generate(model, tok, batch, new_tokens)
    return tokens / max(time.perf_counter() - start, 1e-9)


def speed(model, tok, m: MeasureConfig) -> dict[str, float]:
    """{tokens_per_s_c1, tokens_per_s_c16} of a loaded model (see the module's docstring)."""
    model.eval()
    return {f"tokens_per_s_c{c}": tokens_per_s(model, tok, c, m.requests, m.max_new_tokens) for c in CONCURRENCY}


def held_out(cfg: RaylabConfig, manifest) -> list[dict]:
    """The prompts with references ROUGE-L is scored on: eval.held_out when set, else held-out
    records of the data stage's val split (as `raylab eval`), else none."""
    if cfg.eval.held_out:
        return [it for it in evaluate.read_input(cfg.eval.held_out, "eval.held_out")
                if isinstance(it.get("reference"), str)][:cfg.eval.max_samples]
    return evaluate.held_out_items(cfg, manifest) if manifest is not None else []


def quality(cfg: RaylabConfig, path: str, model, tok, items: list[dict], val: str | None) -> dict:
    """Held-out loss and perplexity on the val split (`evaluate.held_out_loss`, Ray Data: the
    number training and `raylab eval` report) when there is one, and ROUGE-L / exact match of
    greedy answers to `items` (`evaluate.score`) when there are any; {} when neither."""
    out: dict = {}
    if val is not None:
        from raylab.core import cluster

        cluster.connect(cfg)
        loss = evaluate.held_out_loss(cfg, path, val)
        out |= {"eval_loss": loss["loss"], "perplexity": loss["perplexity"]}
    if items:
        prompts = [models.prompt_ids(tok, it) for it in items]
        step = cfg.eval.batch_size
        answers = [a for i in range(0, len(prompts), step)
                   for a in models.greedy(model, tok, prompts[i:i + step], cfg.eval.max_new_tokens)]
        scored = evaluate.score(answers, items)
        out |= {"rouge_l": scored["rouge_l"], "exact_match": scored["exact_match"], "scored": scored["scored"]}
    return out


def ratios(parent: dict, result: dict) -> dict[str, float]:
    """result / parent for size, parameters, memory and speed; the relative eval-loss increase
    (`quality_drop`, what registry.gates.max_quality_drop bounds) and the ROUGE-L change."""
    out = {}
    for key, name in (("size_bytes", "size_ratio"), ("parameters", "parameter_ratio"),
                      ("load_rss_bytes", "memory_ratio"), ("tokens_per_s_c1", "speedup_c1"),
                      ("tokens_per_s_c16", "speedup_c16")):
        if parent.get(key) and result.get(key) is not None:
            out[name] = result[key] / parent[key]
    if parent.get("eval_loss") and result.get("eval_loss") is not None:
        out["quality_drop"] = (result["eval_loss"] - parent["eval_loss"]) / parent["eval_loss"]
    if parent.get("rouge_l") is not None and result.get("rouge_l") is not None:
        out["rouge_l_change"] = result["rouge_l"] - parent["rouge_l"]
    return {k: v for k, v in out.items() if math.isfinite(v)}  # an infinite loss has no ratio worth a gate
