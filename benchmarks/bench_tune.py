"""Sweep efficiency: Optuna TPE + ASHA against random search without early stopping.

Protocol: benchmarks/README.md (version 1). The metric, the problem and the goal below were
fixed (issue 20) before any sweep under this protocol ran, and are not changed after seeing
results; a miss is reported as a miss.

Problem (unchanged since stop 16, fixed from here on): LoRA fine-tuning of the quickstart's
stand-in base (the tiny preset pre-trained by raylab's pretrain stage on the Acme corpus, as
configs/quickstart.yaml; pre-trained once per benchmark run and shared by all its sweeps, since
pre-training is not bit-reproducible) on 120 short tickets (max_seq_len 128, 20 % validation),
24 optimizer steps per full trial, evaluation every 4 steps, searching train.lr loguniform
1e-5..3e-1 and model.lora.r in (4, 8, 16). Both sweeps get the same compute,
`tune.max_total_steps` = 288 optimizer steps (12 full trials), one trial at a time.

    A  `raylab tune`, searcher=tpe (4 random start-up trials), ASHA (grace 4 steps, reduction
       factor 3, SyncedASHA with ASHA's published rule: a trial goes on only in the top
       floor(n/3) of its rung, raylab/tune/asha.py), as many trials as the budget holds
    B  `raylab tune`, searcher=random, no early stopping: 12 trials

Sweeps alternate A, B per seed (A seed 0, B seed 0, A seed 1, ...); seeds 0..N-1 (N >= 10).
Compute is counted in optimizer steps, replayed in trial-creation order (every earlier trial
counted as far as it ran).

Metric (pre-registered): per seed s, target_s = B's final best val loss (its best after all
its trials); steps_B(s) = the steps B spent until its first evaluation at target_s;
steps_A(s) = the steps A spent until its first evaluation <= target_s (A never reaching it
counts as infinitely many steps). The figure is the median over seeds of steps_A / steps_B,
with a bootstrap 90 % interval of that median (10,000 resamples of the seeds, numpy seed 0).
Goal (issue 5's): median <= 0.5. Also reported: the per-seed ratio of sweep wall-clock times
(A / B, median and IQR; no goal), each method's best val loss at the 288-step budget, and,
with --ablations, the same metric for random search + ASHA and for TPE alone (fewer seeds,
said in the JSON).

No simulator is used: every figure comes from sweeps run by this script, kept whole in the
JSON (parameters, evaluations, steps, status, wall time), and --analyse recomputes the figures
from them.

Results before protocol 1 (stops 2-16, 5 seeds, a mean-over-seeds target, a problem and ASHA
rule changed while the goal was missed) are in git history and results/tune_random_base.json.

    make bench NAME=tune   (or: python benchmarks/bench_tune.py [--seeds 10] [--ablations 5] [--resume])
    python benchmarks/bench_tune.py --analyse benchmarks/results/tune.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ACME_DATA,
    TINY,
    machine_facts,
    quartiles,
    require_clean_commit,
    small_llama,
    write_results,
)

from raylab import config, data, train, tune  # noqa: E402
from raylab.core import cluster  # noqa: E402
from raylab.train import pretrain  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
TRIALS = 12
BUDGET = TRIALS * 24  # optimizer steps per sweep: random search's 12 full trials


# The quickstart's pre-training of its stand-in base at protocol 1 (configs/quickstart.yaml
# then), frozen here so the problem does not move with the quickstart.
PRETRAIN = {"max_steps": 600, "lr": 3.0e-3, "batch_size": 8}


def pretrained_base(root: Path) -> str:
    """The stand-in base: the tiny-llama architecture (random weights, byte vocabulary)
    pre-trained for 600 steps on every token of the Acme corpus (as the quickstart did at
    protocol 1), run here; returns the model's path."""
    cfg = config.load_dict({
        "version": 1, "offline": True, "output_dir": str(root / "base"), "data": ACME_DATA,
        "model": {"name_or_path": str(small_llama(root / "tiny", TINY)), "method": "lora"}, "pretrain": PRETRAIN,
        "registry": {"enabled": False},
    })
    data.run_data(cfg)
    meta = train.run_pretrain(cfg)
    print(f"base: pre-trained on the Acme corpus, val loss {meta['metrics']['initial_val_loss']:.3f} -> "
          f"{meta['metrics']['val_loss']:.3f}", file=sys.stderr)
    return pretrain.base_dir(cfg)


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
        "model": {"name_or_path": "set by main: the pre-trained base", "method": "lora"},
        "registry": {"enabled": False},  # benchmarks stay out of the user's registry
        "train": {"batch_size": 4, "max_steps": 24, "eval_every": 4, "log_every": 4, "checkpoint_every": 24,
                  "warmup_ratio": 0.1},
        "tune": {"search_space": {"train.lr": {"loguniform": [1e-5, 3e-1]}, "model.lora.r": {"choice": [4, 8, 16]}},
                 "num_samples": TRIALS, "max_total_steps": BUDGET, "max_concurrent_trials": 1,
                 "startup_trials": 4},
    }


def sweep(raw: dict, root: Path, name: str, seed: int, searcher: str, asha: bool) -> dict:
    """One sweep: its trials in creation order (each one's evaluations, steps, status and
    parameters, from its own metrics.jsonl) and its wall-clock time."""
    out = root / name
    shutil.copytree(root / "data-run" / "data", out / "data")
    items = [f"output_dir={out}", f"tune.seed={seed}", f"tune.searcher={searcher}"]
    # with ASHA, more trials than the budget can hold: the budget ends the sweep
    items += (["tune.asha.grace_period=4", "tune.asha.reduction_factor=3", f"tune.num_samples={4 * TRIALS}"]
              if asha else ["tune.asha=null"])
    if not asha and searcher == "tpe":
        items.append(f"tune.num_samples={TRIALS}")
    started = time.perf_counter()
    summary = tune.run_tune(config.load_dict(raw, items))
    wall = time.perf_counter() - started
    trials = []
    for row in summary["results"]:
        metrics = out / "tune" / "trials" / row["trial_id"] / "train" / "metrics.jsonl"
        history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        evals = [(r["step"], r["val_loss"]) for r in history if r.get("evaluated") and r["step"] > 0]
        trials.append({"trial_id": row["trial_id"], "index": row["index"], "steps": row["steps_run"], "evals": evals,
                       "status": row["status"], "params": {k: row[k] for k in raw["tune"]["search_space"]}})
    trials.sort(key=lambda t: t["index"])  # creation order
    shutil.rmtree(out, ignore_errors=True)
    return {"trials": trials, "wall_s": wall}


def best(trials: list[dict], budget: float = float("inf")) -> float:
    """The lowest val loss among the evaluations made within the first `budget` steps."""
    spent, out = 0, float("inf")
    for t in trials:
        for step, val in t["evals"]:
            if spent + step > budget:
                return out
            out = min(out, val)
        spent += t["steps"]
    return out


def steps_to(trials: list[dict], target: float) -> float:
    """Steps spent until the first evaluation at or below `target` (inf if none)."""
    spent = 0
    for t in trials:
        for step, val in t["evals"]:
            if val <= target:
                return spent + step
        spent += t["steps"]
    return float("inf")


def bootstrap_median(values: list[float], level: float = 0.90, resamples: int = 10_000) -> tuple[float, float]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = np.asarray(values, dtype=float)
    medians = np.median(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)
    lo, hi = np.quantile(medians, [(1 - level) / 2, 1 - (1 - level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


def finite(x: float) -> float | None:
    return x if x != float("inf") else None  # JSON: null = never reached


def steps_point(runs: dict, method: str, label: str, commit: str, goal: bool, **provenance) -> dict:
    """The pre-registered metric for `method` against random search, over the seeds both ran."""
    seeds = sorted(s for m, s in runs if m == method and ("random", s) in runs)
    per_seed = []
    for s in seeds:
        a, b = runs[(method, s)]["trials"], runs[("random", s)]["trials"]
        target = best(b)
        steps_a, steps_b = steps_to(a, target), steps_to(b, target)
        per_seed.append({"seed": s, "target_val_loss": target, "steps_a": finite(steps_a), "steps_b": steps_b,
                         "ratio": finite(steps_a / steps_b), "a_best_at_budget": best(a, BUDGET),
                         "b_best_at_budget": best(b, BUDGET), "a_total_steps": sum(t["steps"] for t in a),
                         "a_trials": len(a), "a_stopped_early": sum(t["status"] == "stopped early" for t in a),
                         "wall_ratio": runs[(method, s)]["wall_s"] / runs[("random", s)]["wall_s"]})
    ratios = [r["ratio"] if r["ratio"] is not None else float("inf") for r in per_seed]
    lo, hi = bootstrap_median(ratios)
    median = float(statistics.median(ratios))
    return {
        "name": f"tune_steps_to_random_best_{method}", "unit": "optimizer steps (per seed, to random search's final best)",
        "higher_is_better": False,
        "a": {"name": label, "median": statistics.median(r["steps_a"] if r["steps_a"] is not None else float("inf")
                                                        for r in per_seed),
              "samples": [r["steps_a"] for r in per_seed], "reached": sum(r["steps_a"] is not None for r in per_seed)},
        "b": {"name": "random search, no early stopping", **quartiles([r["steps_b"] for r in per_seed])},
        "ratio": finite(median), "ratio_q1": finite(lo), "ratio_q3": finite(hi), "interval": "bootstrap 90 % of the median",
        "goal": "<= 0.5" if goal else None, "met": (median <= 0.5) if goal else None,
        "wall_ratio": quartiles([r["wall_ratio"] for r in per_seed]),
        "best_at_budget": {"a": quartiles([r["a_best_at_budget"] for r in per_seed]),
                           "b": quartiles([r["b_best_at_budget"] for r in per_seed])},
        "repeats": len(per_seed), "seeds": per_seed, "warmup": False, "commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_facts(), "protocol": 1,
        **provenance,
    }


def analyse(runs: dict, commit: str, **provenance) -> list[dict]:
    labels = {"tpe_asha": "TPE + ASHA", "random_asha": "random search + ASHA (ablation)", "tpe": "TPE alone (ablation)"}
    records = [steps_point(runs, m, labels[m], commit, goal=(m == "tpe_asha"), **provenance)
               for m in labels if any(k[0] == m for k in runs)]
    wall = records[0]["wall_ratio"]
    records.append({
        "name": "tune_sweep_wall_clock", "unit": "s per sweep", "higher_is_better": False,
        "a": {"name": "TPE + ASHA", **quartiles([runs[k]["wall_s"] for k in sorted(runs) if k[0] == "tpe_asha"])},
        "b": {"name": "random search", **quartiles([runs[k]["wall_s"] for k in sorted(runs) if k[0] == "random"])},
        "ratio": wall["median"], "ratio_q1": wall["q1"], "ratio_q3": wall["q3"], "goal": None, "met": None,
        "repeats": wall["n"], "warmup": False, "commit": commit, "date": records[0]["date"],
        "machine": records[0]["machine"], "protocol": 1, "trials": saved_form(runs)})
    for r in records:
        print(json.dumps({k: v for k, v in r.items() if k not in ("seeds", "trials", "machine")}), flush=True)
    return records


def saved_form(runs: dict) -> dict:
    """{"tpe_asha-0": sweep, ...}: the JSON form of {("tpe_asha", 0): sweep, ...}."""
    return {f"{method}-{seed}": sweep for (method, seed), sweep in runs.items()}


def by_sweep(saved: dict) -> dict:
    """{("tpe_asha", 0): sweep, ...} from the JSON form {"tpe_asha-0": sweep, ...}."""
    return {(key.rsplit("-", 1)[0], int(key.rsplit("-", 1)[1])): sweep for key, sweep in saved.items()}


METHODS = {"tpe_asha": ("tpe", True), "random": ("random", False), "random_asha": ("random", True), "tpe": ("tpe", False)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--ablations", type=int, default=0, metavar="SEEDS",
                        help="also run random + ASHA and TPE alone on the first SEEDS seeds")
    parser.add_argument("--resume", action="store_true", help="reuse the sweeps in results/tune.partial.json")
    parser.add_argument("--analyse", metavar="JSON", help="recompute the figures from the sweeps kept in a result file")
    args = parser.parse_args()
    if args.analyse:
        records = json.loads(Path(args.analyse).read_text())
        write_results(Path(args.analyse).stem, analyse(by_sweep(records[-1]["trials"]), records[0]["commit"],
                                                       base=records[0].get("base")))
        return
    commit = require_clean_commit()
    # Ray Train's controller polls its workers every 2 s; a 24-step trial is over in seconds,
    # so polls are much of its wall time. The same setting for every sweep.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    partial = Path(__file__).resolve().parent / "results" / "tune.partial.json"
    runs = by_sweep(json.loads(partial.read_text())) if args.resume and partial.exists() else {}
    root = Path(tempfile.mkdtemp(prefix="raylab-bench-tune-"))
    try:
        raw = problem(root)
        cluster.connect(config.load_dict(raw), state_api=True)
        raw["model"]["name_or_path"] = pretrained_base(root)  # pre-training needs Ray: connected first
        data.run_data(config.load_dict(raw))
        order = [(m, s) for s in range(args.seeds) for m in ("tpe_asha", "random")]  # A, B alternate per seed
        order += [(m, s) for s in range(args.ablations) for m in ("random_asha", "tpe")]
        for method, seed in order:
            if (method, seed) not in runs:
                runs[(method, seed)] = sweep(raw, root, f"{method}-{seed}", seed, *METHODS[method])
                partial.write_text(json.dumps(saved_form(runs), indent=1))  # keep what was measured if cut short
                print(f"  {method} seed {seed}: {runs[(method, seed)]['wall_s']:.0f}s", file=sys.stderr, flush=True)
        write_results("tune", analyse(runs, commit, base="the quickstart's pre-trained stand-in"))
        partial.unlink(missing_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
