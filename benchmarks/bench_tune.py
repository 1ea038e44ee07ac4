"""Sweep efficiency: Optuna TPE + ASHA against random search without early stopping, on
the same small problem, over several seeds.

Problem: LoRA on the tiny preset over a small learnable corpus (120 short tickets, 24
optimizer steps per trial, evaluation every 4), searching train.lr over the range a team
would search without prior knowledge (loguniform 1e-5..3e-1; only about a fifth of it
trains well in 24 steps: too low learns nothing, too high plateaus) and model.lora.r (4, 8,
16); 12 trials per sweep, one at a time (so a sweep is deterministic for its seed;
concurrency changes which results TPE and ASHA have seen, not the compute).

    raylab    `raylab tune` with searcher=tpe (4 random start-up trials) and ASHA (grace 4
              steps, reduction factor 3)
    baseline  `raylab tune` with searcher=random and no early stopping

Compute is counted in optimizer steps. "Steps to target" replays each sweep in trial-creation
order: the steps of every earlier trial (as far as it ran) plus the steps the reaching trial
needed until an evaluation at or below the target. The target is the loosest best val loss
over all sweeps, so every sweep reaches it. "Best at equal budget" gives random search the
steps the TPE + ASHA sweep spent, in the same replay order.

    python benchmarks/bench_tune.py [--seeds 3]

Target (issue 5): TPE + ASHA needs <= 0.5x the steps of random search to reach the target.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measurement, write_results  # noqa: E402

from raylab import cluster, config, data, tune  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
TRIALS = 12


def problem(root: Path) -> dict:
    corpus = root / "docs.jsonl"
    with corpus.open("w") as f:
        for i in range(120):
            c = COLORS[i % len(COLORS)]
            f.write(json.dumps({"text": f"Ticket {i}: the {c} widget is in stock. The {c} widget ships today."}) + "\n")
    return {
        "version": 1, "offline": True, "output_dir": str(root / "data-run"),
        "data": {"sources": [{"type": "jsonl", "path": str(corpus)}], "max_seq_len": 128, "val_fraction": 0.2,
                 "dedup": {"near": False}},
        "model": {"name_or_path": "preset:tiny-llama", "method": "lora"},
        "registry": {"enabled": False},  # benchmarks stay out of the user's registry
        "train": {"batch_size": 4, "max_steps": 24, "eval_every": 4, "log_every": 4, "checkpoint_every": 24,
                  "warmup_ratio": 0.1},
        "tune": {"search_space": {"train.lr": {"loguniform": [1e-5, 3e-1]}, "model.lora.r": {"choice": [4, 8, 16]}},
                 "num_samples": TRIALS, "max_concurrent_trials": 1, "startup_trials": 4},
    }


def sweep(raw: dict, root: Path, name: str, seed: int, searcher: str, asha: bool) -> list[dict]:
    out = root / name
    shutil.copytree(root / "data-run" / "data", out / "data")
    items = [f"output_dir={out}", f"tune.seed={seed}", f"tune.searcher={searcher}"]
    items += ["tune.asha.grace_period=4", "tune.asha.reduction_factor=3"] if asha else ["tune.asha=null"]
    summary = tune.run_tune(config.load_dict(raw, items), log=lambda *_: None)
    trials = []
    for row in summary["results"]:  # each trial's evaluations, from its own metrics.jsonl
        metrics = out / "tune" / "trials" / row["trial_id"] / "train" / "metrics.jsonl"
        history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        evals = [(r["step"], r["val_loss"]) for r in history if r.get("evaluated") and r["step"] > 0]
        trials.append({"trial_id": row["trial_id"], "index": row["index"], "steps": row["steps_run"], "evals": evals,
                       "status": row["status"]})
    trials.sort(key=lambda t: t["index"])  # creation order
    return trials


def best(trials: list[dict], budget: float = float("inf")) -> float:
    spent, out = 0, float("inf")
    for t in trials:
        for step, val in t["evals"]:
            if spent + step > budget:
                return out
            out = min(out, val)
        spent += t["steps"]
    return out


def steps_to(trials: list[dict], target: float) -> int | None:
    spent = 0
    for t in trials:
        for step, val in t["evals"]:
            if val <= target:
                return spent + step
        spent += t["steps"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="raylab-bench-tune-"))
    try:
        raw = problem(root)
        cluster.connect(config.load_dict(raw), state_api=True)
        data.run_data(config.load_dict(raw), log=lambda *_: None)
        runs = {}
        partial = Path(__file__).resolve().parent / "results" / "tune.partial.json"
        for seed in range(args.seeds):
            runs[("tpe_asha", seed)] = sweep(raw, root, f"tpe-{seed}", seed, "tpe", asha=True)
            runs[("random", seed)] = sweep(raw, root, f"random-{seed}", seed, "random", asha=False)
            # Sweeps are slow: keep what has been measured if the run is cut short.
            partial.write_text(json.dumps({f"{k[0]}-{k[1]}": v for k, v in runs.items()}, indent=1))
        target = max(best(trials) for trials in runs.values())
        per_seed = []
        for seed in range(args.seeds):
            tpe, rnd = runs[("tpe_asha", seed)], runs[("random", seed)]
            tpe_spent = sum(t["steps"] for t in tpe)
            per_seed.append({
                "seed": seed, "tpe_asha_steps_to_target": steps_to(tpe, target), "random_steps_to_target": steps_to(rnd, target),
                "tpe_asha_total_steps": tpe_spent, "random_total_steps": sum(t["steps"] for t in rnd),
                "tpe_asha_best": best(tpe), "random_best_at_equal_budget": best(rnd, tpe_spent),
                "tpe_asha_stopped_early": sum(t["status"] == "stopped early" for t in tpe),
            })
        tpe_steps = statistics.mean(s["tpe_asha_steps_to_target"] for s in per_seed)
        rnd_steps = statistics.mean(s["random_steps_to_target"] for s in per_seed)
        records = [
            measurement("tune_steps_to_target_val_loss", tpe_steps, "optimizer steps (mean over seeds)",
                        "random search, no early stopping", rnd_steps, target="<= 0.5", target_val_loss=target,
                        seeds=per_seed),
            measurement("tune_best_val_loss_at_equal_budget", statistics.mean(s["tpe_asha_best"] for s in per_seed),
                        "val loss (mean over seeds)", "random search, same steps",
                        statistics.mean(s["random_best_at_equal_budget"] for s in per_seed),
                        note="lower is better; ratio < 1 favours TPE + ASHA"),
            measurement("tune_total_steps", statistics.mean(s["tpe_asha_total_steps"] for s in per_seed),
                        f"optimizer steps per {TRIALS}-trial sweep (mean)", "random search, no early stopping",
                        statistics.mean(s["random_total_steps"] for s in per_seed)),
        ]
        write_results("tune", records)
        partial.unlink(missing_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
