"""Sweep efficiency: Optuna TPE + ASHA against random search without early stopping, on
the same small fine-tuning problem, over several seeds.

Problem: LoRA fine-tuning of a pre-trained base on a small corpus (120 short tickets, 24
optimizer steps per trial, evaluation every 4), searching train.lr over the range a team
would search without prior knowledge (loguniform 1e-5..3e-1) and model.lora.r (4, 8, 16).
The base is the quickstart's stand-in for a real pre-trained model: the tiny preset
pre-trained by raylab's pretrain stage (600 steps, lr 3e-3, as configs/quickstart.yaml) on
the Acme sample corpus in examples/acme, a different text from the tickets. On it val loss
responds to the learning rate the way it does on real models (the committed run, after 24
steps): too low barely moves it (6.36 at 2.5e-5, 5.45 at 2.3e-4), an optimum near 1.6e-2
(0.178 at r=16; r=16 beats 8, and 8 beats 4, near it), then a cliff (0.94 at 2.9e-2, ~3.1
above 7.5e-2). The base is pre-trained afresh by every run and is not bit-reproducible (its
Acme val loss was 0.371, 0.382 and 0.351 in three runs), so sweeps from different runs are
never mixed. Both sweeps get the same compute, `tune.max_total_steps` = 288 optimizer
steps (12 full trials), and run one trial at a time (so a sweep is deterministic for its
seed; concurrency changes which results TPE and ASHA have seen, not the compute).

    raylab    `raylab tune` with searcher=tpe (4 random start-up trials) and ASHA (grace 4
              steps, reduction factor 3, SyncedASHA: a stopped trial trains no step past its
              rung, and a trial goes on only in the top floor(n/3) of its rung): as many
              trials as the budget holds
    baseline  `raylab tune` with searcher=random and no early stopping: 12 trials

Until stop 9 (results/tune_random_base.json, `--base random`) the LoRA was trained on the
preset's random weights. That is not fine-tuning: no trial got below 4.97 from 5.55 (the
uniform loss over the byte vocabulary, ln 256), the trials fell into three bands (5.55 "learns
nothing", ~5.23 a unigram plateau, 4.97-5.13 "learns"), and the step-4 losses of the last two
bands overlapped, so ASHA's first rung ranked by noise. TPE + ASHA reached random search's
final mean val loss in 0.62x of its steps there (target <= 0.5x, not met). The problem was
changed after that miss, because the issue's question (which learning rate, which LoRA rank)
is asked of pre-trained models; the old result stays committed and reproducible.

On this problem, with Ray's own ASHA rule (continue when at or above the 67th percentile,
interpolated, of the trials recorded earlier at the rung), TPE + ASHA needed 0.65x of random
search's steps (156 vs 240, stop 16). That rule lets a sweep's first trials through their
rungs with little to compare against, and with one trial at a time they train to the end.
SyncedASHA now uses ASHA's published promotion rule (top floor(n/3) of the rung, itself
included; raylab/asha.py): 0.45x in the committed run (108 vs 240). The rule was tried after
a simulator, which replays that stop's learning curves interpolated in log lr, put it at
0.44x over 40 seeds against 0.53x for Ray's rule; with 5 seeds the measured ratio is noisy
(the simulator gives it an interquartile range of 0.37-0.61).

Compute is counted in optimizer steps. Each sweep is replayed in trial-creation order: at a
budget of b steps, a sweep's best is the lowest val loss among the evaluations made within
its first b steps (every earlier trial counted as far as it ran).

    steps to target   the standard "speed-up over random search" of the HPO literature
                      (Li et al. 2017, Hyperband; Falkner et al. 2018, BOHB): the target is
                      random search's final performance, the mean over seeds of its best
                      val loss after all its trials; each method's cost is the smallest
                      budget at which its mean-over-seeds best reaches that target.
    best at equal     each sweep's best within the 288-step budget (a sweep may overrun it by the
    budget            steps its last trials ran past their last result).

Also reported, as first measured (stops 2-6): per seed, the steps to reach the loosest best
val loss over all sweeps. That target is the worst sweep's best, so it loosens as seeds are
added, and seeds whose first (shared, random) trials reach it tie at 1.0x whatever the
method: with enough seeds the ratio tends to 1 by construction.

    python benchmarks/bench_tune.py [--seeds 5] [--base pretrained|random] [--resume]
    python benchmarks/bench_tune.py --analyse benchmarks/results/tune.json

--resume reuses the sweeps of a run that was cut short (results/tune[_random_base].partial.json).
Every sweep's trials (parameters, evaluations, steps, status) are kept in the JSON, and
--analyse recomputes the figures from them (keeping the commit the sweeps ran at as
sweeps_commit).

Target (issue 5): TPE + ASHA needs <= 0.5x the steps of random search to reach the target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measurement, write_results  # noqa: E402

from raylab import config, data, train, tune  # noqa: E402
from raylab.core import cluster  # noqa: E402
from raylab.train import pretrain  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
TRIALS = 12
BUDGET = TRIALS * 24  # optimizer steps per sweep: random search's 12 full trials
REPO = Path(__file__).resolve().parent.parent
# --base: (results/<name>.json, the base as the JSON names it)
BASES = {"pretrained": ("tune", "the quickstart's pre-trained stand-in"),
         "random": ("tune_random_base", "random weights (tiny preset)")}


def pretrained_base(root: Path) -> str:
    """The quickstart's stand-in base: its data and pretrain sections (the Acme corpus, 600
    steps of continued pre-training of the tiny preset), run here; returns the model's path."""
    import yaml

    quick = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    for source in quick["data"]["sources"]:
        source["path"] = str(REPO / source["path"])
    cfg = config.load_dict({
        "version": 1, "offline": True, "output_dir": str(root / "base"), "data": quick["data"],
        "model": {"name_or_path": "preset:tiny-llama", "method": "lora"}, "pretrain": quick["pretrain"],
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
        "model": {"name_or_path": "preset:tiny-llama", "method": "lora"},
        "registry": {"enabled": False},  # benchmarks stay out of the user's registry
        "train": {"batch_size": 4, "max_steps": 24, "eval_every": 4, "log_every": 4, "checkpoint_every": 24,
                  "warmup_ratio": 0.1},
        "tune": {"search_space": {"train.lr": {"loguniform": [1e-5, 3e-1]}, "model.lora.r": {"choice": [4, 8, 16]}},
                 "num_samples": TRIALS, "max_total_steps": BUDGET, "max_concurrent_trials": 1,
                 "startup_trials": 4},
    }


def sweep(raw: dict, root: Path, name: str, seed: int, searcher: str, asha: bool) -> list[dict]:
    out = root / name
    shutil.copytree(root / "data-run" / "data", out / "data")
    items = [f"output_dir={out}", f"tune.seed={seed}", f"tune.searcher={searcher}"]
    # with ASHA, more trials than the budget can hold: the budget ends the sweep
    items += (["tune.asha.grace_period=4", "tune.asha.reduction_factor=3", f"tune.num_samples={4 * TRIALS}"]
              if asha else ["tune.asha=null"])
    summary = tune.run_tune(config.load_dict(raw, items))
    trials = []
    for row in summary["results"]:  # each trial's evaluations, from its own metrics.jsonl
        metrics = out / "tune" / "trials" / row["trial_id"] / "train" / "metrics.jsonl"
        history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        evals = [(r["step"], r["val_loss"]) for r in history if r.get("evaluated") and r["step"] > 0]
        trials.append({"trial_id": row["trial_id"], "index": row["index"], "steps": row["steps_run"], "evals": evals,
                       "status": row["status"], "params": {k: row[k] for k in raw["tune"]["search_space"]}})
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


def budgets(trials: list[dict]) -> list[int]:
    """The replay budgets at which a sweep's best can change: one per evaluation."""
    out, spent = [], 0
    for t in trials:
        out += [spent + step for step, _ in t["evals"]]
        spent += t["steps"]
    return out


def mean_curve_steps_to(sweeps: list[list[dict]], target: float) -> int | None:
    """Smallest budget at which the mean over seeds of the best-so-far val loss is <= target."""
    for b in sorted({b for trials in sweeps for b in budgets(trials)}):
        if statistics.mean(best(trials, b) for trials in sweeps) <= target + 1e-12:
            return b
    return None


def analyse(runs: dict, seeds: int, **provenance) -> list[dict]:
    tpe = [runs[("tpe_asha", s)] for s in range(seeds)]
    rnd = [runs[("random", s)] for s in range(seeds)]
    target = statistics.mean(best(trials) for trials in rnd)  # random search's final performance
    loosest = max(best(trials) for trials in tpe + rnd)
    per_seed = []
    for seed, (t, r) in enumerate(zip(tpe, rnd, strict=True)):
        spent = sum(x["steps"] for x in t)
        per_seed.append({
            "seed": seed, "tpe_asha_best": best(t, BUDGET), "random_best": best(r, BUDGET),
            "tpe_asha_total_steps": spent, "random_total_steps": sum(x["steps"] for x in r),
            "tpe_asha_steps_to_loosest_best": steps_to(t, loosest), "random_steps_to_loosest_best": steps_to(r, loosest),
            "tpe_asha_trials": len(t), "tpe_asha_stopped_early": sum(x["status"] == "stopped early" for x in t),
        })
    mean = lambda key: statistics.mean(s[key] for s in per_seed)  # noqa: E731
    return [
        measurement("tune_steps_to_target_val_loss", mean_curve_steps_to(tpe, target),
                    "optimizer steps (mean-over-seeds best-so-far curve)", "random search, no early stopping",
                    mean_curve_steps_to(rnd, target), target="<= 0.5", target_val_loss=target,
                    target_definition="random search's final performance: mean over seeds of its best val loss",
                    seeds=per_seed, **provenance),
        measurement("tune_best_val_loss_at_equal_budget", mean("tpe_asha_best"), f"val loss after {BUDGET} steps (mean over seeds)",
                    "random search, same steps", mean("random_best"),
                    note="lower is better; ratio < 1 favours TPE + ASHA"),
        measurement("tune_total_steps", mean("tpe_asha_total_steps"), f"optimizer steps per sweep (mean; budget {BUDGET})",
                    "random search, no early stopping", mean("random_total_steps")),
        measurement("tune_steps_to_loosest_best", mean("tpe_asha_steps_to_loosest_best"),
                    "optimizer steps (mean over seeds)", "random search, no early stopping",
                    mean("random_steps_to_loosest_best"), target_val_loss=loosest,
                    note="the first metric (stops 2-6); its target loosens as seeds are added, see the docstring",
                    trials=saved_form(runs)),
    ]


def saved_form(runs: dict) -> dict:
    """{"tpe_asha-0": trials, ...}: the JSON form of {("tpe_asha", 0): trials, ...}."""
    return {f"{method}-{seed}": trials for (method, seed), trials in runs.items()}


def by_sweep(saved: dict) -> dict:
    """{("tpe_asha", 0): trials, ...} from the JSON form {"tpe_asha-0": trials, ...}."""
    return {(key.rsplit("-", 1)[0], int(key.rsplit("-", 1)[1])): trials for key, trials in saved.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--base", choices=sorted(BASES), default="pretrained",
                        help="the LoRA's base: the quickstart's pre-trained stand-in, or the preset's random weights "
                             "(the problem of stops 2-9)")
    parser.add_argument("--resume", action="store_true", help="reuse the sweeps in results/<result>.partial.json")
    parser.add_argument("--analyse", metavar="JSON", help="recompute the figures from the trials kept in a result file")
    args = parser.parse_args()
    if args.analyse:
        records = json.loads(Path(args.analyse).read_text())
        runs = by_sweep(records[-1]["trials"])
        keep = {k: records[0][k] for k in ("base",) if k in records[0]}
        write_results(Path(args.analyse).stem, analyse(runs, len(runs) // 2, **keep,
                      sweeps_commit=records[0].get("sweeps_commit", records[0]["commit"])))
        return
    # Ray Train's controller polls its workers every 2 s; a 24-step trial is over in seconds,
    # so polls are much of its wall time. Wall time only: the steps counted do not change.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    result, base = BASES[args.base]
    partial = Path(__file__).resolve().parent / "results" / f"{result}.partial.json"
    runs = {}
    if args.resume and partial.exists():
        runs = by_sweep(json.loads(partial.read_text()))
    root = Path(tempfile.mkdtemp(prefix="raylab-bench-tune-"))
    try:
        raw = problem(root)
        cluster.connect(config.load_dict(raw), state_api=True)
        if args.base == "pretrained":  # pre-training needs Ray: connected first
            raw["model"]["name_or_path"] = pretrained_base(root)
        data.run_data(config.load_dict(raw))
        for seed in range(args.seeds):
            for method, searcher, asha in (("tpe_asha", "tpe", True), ("random", "random", False)):
                if (method, seed) not in runs:
                    runs[(method, seed)] = sweep(raw, root, f"{method}-{seed}", seed, searcher, asha)
                    # Sweeps are slow: keep what has been measured if the run is cut short.
                    partial.write_text(json.dumps(saved_form(runs), indent=1))
        write_results(result, analyse(runs, args.seeds, base=base))
        partial.unlink(missing_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
