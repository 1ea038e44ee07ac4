"""Training: raylab's train stage against the limit (its own training step with no Ray),
its fixed cost against a minimal Ray Train program, and packing against dynamic padding.

Protocol: benchmarks/README.md (version 1): A and B alternate, 5 pairs per point after one
untimed pair, median and interquartile range of the per-pair ratios, clean commit.

Problem (fixed before running): the quickstart corpus (examples/acme) through `raylab data`
with the benchmark model's tokenizer, max_seq_len 512, packed; the benchmark model is a
4-layer Llama (hidden 256, byte-level vocabulary, random weights, benchmarks/common.py
`small_llama`); LoRA r=8 on all linear layers, dropout 0, batch 8 x 512, grad_accum 1,
AdamW, fp32 on CPU, 30 optimizer steps, a log row every 5 steps, evaluation only at step
30, one worker, the registry off. Both sides read the same Parquet split.

Points and goals:

1. `train_vs_limit` (threads = the plan's torch threads for one worker = the machine's
   cores). A: `raylab train` in a fresh process. B, the limit: benchmarks/train_limit.py in
   a fresh process with the same thread count: the same config, model loading, objective,
   optimizer, schedule and `train.loss.train_step` on the same pre-collated batches in the
   same order, no Ray, at the scheduling priority Ray gives its workers (niceness 15,
   Ray's `worker_niceness`; matched like the threads, so on a busy machine the ratio is not
   the OS preferring the limit). Metric: real (non-padding) tokens per second of wall clock from the
   end of step 5 to the end of step 25 (so the first logging interval, the evaluation before
   training and the final evaluation at step 30 are excluded on both sides; data feeding,
   logging and Ray Train's reporting in between are included). A / B measures what Ray
   Train and raylab's loop add per step. Goal: >= 0.95.
2. `train_vs_limit_1_thread`: point 1 with `train.torch_threads=1` and the limit at 1
   thread. Goal: >= 0.95.
3. `train_30_step_job_wall_s`: from point 1's samples, process start to exit: `raylab train`
   (Ray start, workers, baseline and final evaluation, checkpoints, final model) against the
   limit process (imports, model load, 30 steps). Reported, no goal (lower is better).
4. `train_fixed_cost_s`: process start to the end of the first optimizer step. A: `raylab
   train` with max_steps 2 and a log row every step (its step-1 row's time; raylab evaluates
   the base before step 1, which is counted: it is raylab's cost). B:
   benchmarks/bare_torchtrainer.py, a minimal one-worker TorchTrainer doing the same read
   (pyarrow in the driver, one block to Ray Data) and one AdamW step. Both start an embedded
   Ray with a dashboard. Reported, no goal (lower is better).
5. `packed_vs_dynamic_padding`: the limit harness on the packed split (A) against the same
   harness on the `data.packing: pad` split with each batch cut to its longest row (B,
   dynamic padding, as a padding collator does), same documents, threads = cores. Metric as
   point 1 (real tokens/s, steps 6-25). Goal (issue 4's): >= 1.5.

    make bench NAME=train        (or: python benchmarks/bench_train.py [--repeats 5])
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ACME_DATA, alternate, point, require_clean_commit, small_llama, write_results  # noqa: E402

from raylab import config  # noqa: E402

HERE = Path(__file__).resolve().parent
STEPS, LOG_EVERY = 30, 5
SPAN = (LOG_EVERY, STEPS - LOG_EVERY)  # steps 6..25: after the first log row, before the final evaluation
CORES = len(os.sched_getaffinity(0))
NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))  # what the raylet gives Train workers
# The job, frozen at protocol 1 (the quickstart's data, LoRA and train settings then), so a
# change to configs/quickstart.yaml never changes this benchmark's problem.
JOB = {"version": 1, "offline": True, "data": ACME_DATA,
       "model": {"method": "lora", "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}},
       "train": {"cpus_per_worker": 0.5, "lr": 3.0e-3}}


def overrides(root: Path, model_dir: Path, **extra) -> list[str]:
    items = {"output_dir": root, "model.name_or_path": model_dir, "train.max_steps": STEPS, "train.eval_every": STEPS,
             "train.log_every": LOG_EVERY, "train.num_workers": 1, "train.batch_size": 8, "train.grad_accum": 1,
             "train.epochs": 100, "model.lora.dropout": 0.0, "registry.enabled": "false"}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


class Bench:
    def __init__(self, root: Path):
        self.root, self.n = root, 0
        self.model = small_llama(root / "model")
        self.env = {**os.environ, "RAYLAB_HOME": str(root / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
        self.job = root / "job.yaml"
        self.job.write_text(yaml.safe_dump(JOB))
        self.data = {mode: self.data_stage(mode) for mode in ("pack", "pad")}

    def raylab(self, *args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "raylab", *args], env=self.env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"raylab {' '.join(args[:2])} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        self.last_stdout = proc.stdout

    def data_stage(self, mode: str) -> Path:
        out = self.root / f"data-{mode}"
        self.raylab("data", str(self.job), *overrides(out, self.model, **{"data.packing": mode}))
        return out / "data"

    def fresh(self, mode: str = "pack") -> Path:
        """A new output_dir holding the data stage's output (a train run there starts from step 0)."""
        self.n += 1
        out = self.root / f"run-{self.n}"
        shutil.copytree(self.data[mode].parent, out)
        shutil.rmtree(out / "train", ignore_errors=True)
        return out

    def raylab_train(self, threads: int | None, **extra) -> dict:
        out = self.fresh()
        extra = extra | ({"train.torch_threads": threads} if threads else {})
        start = time.time()
        self.raylab("train", str(self.job), *overrides(out, self.model, **extra))
        end = time.time()
        used = int(re.search(r"worker\(s\) x (\d+) thread", self.last_stdout).group(1))
        rows = {r["step"]: r for r in map(json.loads, (out / "train" / "metrics.jsonl").read_text().splitlines())}
        shutil.rmtree(out)
        return {"start": start, "end": end, "threads": used, "rows": rows}

    def limit(self, threads: int, mode: str = "pack", **extra) -> dict:
        out = self.fresh(mode)
        cfg = config.load(self.job, overrides(out, self.model, **extra))
        (out / "cfg.json").write_text(json.dumps(cfg.model_dump(mode="json")))
        start = time.time()
        subprocess.run([sys.executable, str(HERE / "train_limit.py"), str(out / "cfg.json"), str(out / "data"),
                        str(out / "limit.json"), "--threads", str(threads)] + (["--dynamic-padding"] if mode == "pad" else []),
                       env=self.env, check=True, preexec_fn=lambda: os.nice(NICENESS))
        end = time.time()
        result = json.loads((out / "limit.json").read_text())
        shutil.rmtree(out)
        rows, tokens = {}, 0
        for r in result["steps"]:
            tokens += r["real_tokens"]
            rows[r["step"]] = {"time": r["time"], "tokens": tokens}
        return {"start": start, "end": end, "threads": result["threads"], "rows": rows}

    def bare_first_step(self, threads: int) -> float:
        out = self.root / "bare.json"
        start = time.time()
        subprocess.run([sys.executable, str(HERE / "bare_torchtrainer.py"), str(self.model), str(self.data["pack"]),
                        str(out), "--threads", str(threads)], env=self.env, check=True, capture_output=True)
        return json.loads(out.read_text())["first_step"] - start


def span_tokens_per_s(run: dict) -> float:
    a, b = run["rows"][SPAN[0]], run["rows"][SPAN[1]]
    return (b["tokens"] - a["tokens"]) / (b["time"] - a["time"])


def vs_limit(bench: Bench, name: str, threads: int, repeats: int, records: list, walls: bool) -> None:
    runs = {"a": [], "b": []}

    def a() -> float:
        runs["a"].append(bench.raylab_train(threads if threads != CORES else None))
        if runs["a"][-1]["threads"] != threads:
            raise SystemExit(f"raylab trained with {runs['a'][-1]['threads']} threads, the limit with {threads}: not matched")
        return span_tokens_per_s(runs["a"][-1])

    def b() -> float:
        runs["b"].append(bench.limit(threads))
        return span_tokens_per_s(runs["b"][-1])

    s = alternate(a, b, repeats)
    records.append(point(name, "real tokens/s", ("raylab train (1 worker)", s["a"]), ("limit: train_step, no Ray", s["b"]),
                         goal=">= 0.95", goal_ratio=0.95, warmup=True, load=s["load"], threads=threads, steps=STEPS,
                         span=f"steps {SPAN[0] + 1}-{SPAN[1]}"))
    if walls:  # point 3 from the timed samples (the warm-up pair is the first of each list)
        wall = {k: [r["end"] - r["start"] for r in v[1:]] for k, v in runs.items()}
        records.append(point("train_30_step_job_wall_s", "s", ("raylab train, process start to exit", wall["a"]),
                             ("limit process, start to exit", wall["b"]), higher_is_better=False, warmup=True,
                             load=s["load"], threads=threads, steps=STEPS))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--points", default="1,2,4,5", help="which points to run (3 comes with 1)")
    args = parser.parse_args()
    require_clean_commit()
    wanted = set(args.points.split(","))
    root = Path(tempfile.mkdtemp(prefix="raylab-bench-train-"))
    records: list[dict] = []
    try:
        bench = Bench(root)
        if "1" in wanted:
            vs_limit(bench, "train_vs_limit", CORES, args.repeats, records, walls=True)
        if "2" in wanted:
            vs_limit(bench, "train_vs_limit_1_thread", 1, args.repeats, records, walls=False)
        if "4" in wanted:
            def a() -> float:
                run = bench.raylab_train(None, **{"train.max_steps": 2, "train.log_every": 1, "train.eval_every": 2})
                return run["rows"][1]["time"] - run["start"]

            s = alternate(a, lambda: bench.bare_first_step(CORES), args.repeats)
            records.append(point("train_fixed_cost_s", "s", ("raylab train: start to first optimizer step", s["a"]),
                                 ("bare TorchTrainer: start to first optimizer step", s["b"]), higher_is_better=False,
                                 warmup=True, load=s["load"], threads=CORES))
        if "5" in wanted:
            s = alternate(lambda: span_tokens_per_s(bench.limit(CORES, "pack")),
                          lambda: span_tokens_per_s(bench.limit(CORES, "pad", **{"data.packing": "pad"})), args.repeats)
            records.append(point("packed_vs_dynamic_padding", "real tokens/s", ("packed rows (limit harness)", s["a"]),
                                 ("dynamic padding: pad to the batch's longest (limit harness)", s["b"]),
                                 goal=">= 1.5", goal_ratio=1.5, warmup=True, load=s["load"], threads=CORES, steps=STEPS,
                                 span=f"steps {SPAN[0] + 1}-{SPAN[1]}"))
        write_results("train", records)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
