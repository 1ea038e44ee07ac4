"""What a sweep produced: the trials ranked (results.json, results.csv, the console table),
the winner's config (best.yaml), and what it learned about its knobs: hyperparameter
importance, partial dependence and Optuna's slice plot, each as a PNG and as numbers in JSON.

- Importance: Optuna's default evaluator (PED-ANOVA in Optuna 5) over the trials that
  reported the metric, rebuilt as an Optuna study from the results table, so it covers
  resumed sweeps too. (fANOVA would need scikit-learn, which raylab does not install.)
- Partial dependence (Friedman 2001): a surrogate is fitted over the trials — kernel ridge
  regression with an RBF kernel on parameters scaled to [0, 1] (log scale for loguniform,
  one-hot for choices) — then for each of the most important parameters the surrogate's
  prediction is averaged over the observed values of the others at each grid point.
  With a handful of trials the curves are rough: they show the direction, not a fit.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from typing import Any

import numpy as np

from raylab import config
from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.tune.space import decode, distributions, encode, with_params

log = logging.getLogger(__name__)


GRID = 25
ANALYSIS_FILES = ("importance", "importance_png", "partial_dependence", "partial_dependence_png", "slice_png")
TRIAL_DIR = re.compile(r"_([0-9a-f]{8})_(\d+)_")  # Tune names a trial's directory <fn>_<trial id>_<index>_...


def _usable(rows: list[dict], metric: str) -> list[dict]:
    return [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]


def study_of(rows: list[dict], space: dict, metric: str, mode: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = distributions(space)
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for r in _usable(rows, metric):
        params = {k: encode(r[k]) for k in space}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r[metric])))
    return study


class _Encoder:
    """Parameters -> features in [0, 1] (one-hot for choices)."""

    def __init__(self, space: dict):
        self.space = space

    def column(self, key: str, values: list) -> np.ndarray:
        dim = self.space[key]
        if dim.choice is not None:
            choices = [json.dumps(c) for c in dim.choice]
            return np.array([[1.0 if json.dumps(v) == c else 0.0 for c in choices] for v in values])
        lo, hi = dim.loguniform or dim.uniform or dim.randint
        x = np.asarray(values, dtype=float)
        if dim.loguniform:
            x, lo, hi = np.log(x), math.log(lo), math.log(hi)
        return ((x - lo) / (hi - lo))[:, None]

    def matrix(self, rows: list[dict]) -> np.ndarray:
        return np.hstack([self.column(k, [r[k] for r in rows]) for k in self.space])


def _fit(x: np.ndarray, y: np.ndarray, length: float = 0.5, ridge: float = 1e-2):
    mean, scale = y.mean(), y.std() or 1.0
    gram = np.exp(-((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) / (2 * length**2))
    alpha = np.linalg.solve(gram + ridge * np.eye(len(x)), (y - mean) / scale)

    def predict(q: np.ndarray) -> np.ndarray:
        k = np.exp(-((q[:, None, :] - x[None, :, :]) ** 2).sum(-1) / (2 * length**2))
        return mean + scale * (k @ alpha)

    return predict


def _grid(dim) -> list:
    if dim.choice is not None:
        return list(dim.choice)
    if dim.loguniform:
        return np.geomspace(*dim.loguniform, GRID).tolist()
    if dim.uniform:
        return np.linspace(*dim.uniform, GRID).tolist()
    lo, hi = dim.randint
    return sorted(set(np.linspace(lo, hi - 1, min(GRID, hi - lo)).round().astype(int).tolist()))


def partial_dependence(rows: list[dict], space: dict, metric: str, keys: list[str]) -> dict[str, dict]:
    usable = _usable(rows, metric)
    enc = _Encoder(space)
    predict = _fit(enc.matrix(usable), np.array([r[metric] for r in usable], dtype=float))
    out = {}
    for key in keys:
        grid = _grid(space[key])
        curve = []
        for value in grid:
            probe = [{**r, key: value} for r in usable]
            curve.append(float(predict(enc.matrix(probe)).mean()))
        out[key] = {"grid": grid, "mean_prediction": curve, "observed": [[r[key], r[metric]] for r in usable],
                    "log_scale": bool(space[key].loguniform)}
    return out


def _png(location: str, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.tight_layout()
    storage.save_figure(fig, location, dpi=100)
    plt.close(fig)


def write(run: runs.Run, rows: list[dict], space: dict, metric: str, mode: str) -> dict[str, Any]:
    """Write the analysis files; returns what was written (or why not)."""
    import optuna

    usable = _usable(rows, metric)
    if len(usable) < 2:
        return {"skipped": f"{len(usable)} trial(s) reported {metric}; importance needs at least 2"}
    study = study_of(rows, space, metric, mode)
    importance = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()} if len(space) > 1 \
        else {next(iter(space)): 1.0}
    top = list(importance)[: min(3, len(importance))]
    pd = partial_dependence(rows, space, metric, top)
    storage.write_text(run.tune_file("importance"),
                       json.dumps({"evaluator": "PED-ANOVA (optuna default)" if len(space) > 1 else "single parameter",
                                   "metric": metric, "trials": len(usable), "importance": importance}, indent=2) + "\n")
    storage.write_text(run.tune_file("partial_dependence"),
                       json.dumps({"metric": metric, "surrogate": "RBF kernel ridge on [0,1]-scaled parameters",
                                   "trials": len(usable), "curves": pd}, indent=2, default=str) + "\n")

    def draw_importance(plt):
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(importance)))
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names], color="tab:blue")
        ax.set_xlabel(f"importance for {metric} (PED-ANOVA)")
        return fig

    def draw_pd(plt):
        fig, axes = plt.subplots(1, len(pd), figsize=(4.5 * len(pd), 3.5), squeeze=False)
        for ax, (key, curve) in zip(axes[0], pd.items(), strict=True):
            labels = [json.dumps(g) if isinstance(g, (list, dict)) else g for g in curve["grid"]]
            if space[key].choice is not None:
                ax.bar([str(v) for v in labels], curve["mean_prediction"], color="tab:orange")
            else:
                ax.plot(labels, curve["mean_prediction"], color="tab:orange", label="partial dependence")
                ax.scatter([o[0] for o in curve["observed"]], [o[1] for o in curve["observed"]], s=12, label="trials")
                if curve["log_scale"]:
                    ax.set_xscale("log")
                ax.legend(fontsize=8)
            ax.set_xlabel(key)
            ax.set_ylabel(metric)
        return fig

    def draw_slice(plt):
        axes = optuna.visualization.matplotlib.plot_slice(study)
        return np.atleast_1d(axes).flat[0].figure

    _png(run.tune_file("importance_png"), draw_importance)
    _png(run.tune_file("partial_dependence_png"), draw_pd)
    _png(run.tune_file("slice_png"), draw_slice)
    return {"importance": importance, "partial_dependence_for": top,
            "files": [runs.TUNE_FILES[k] for k in ANALYSIS_FILES]}


# ---------------------------------------------------------------- results


def rows_of(cfg: RaylabConfig, grid) -> list[dict]:
    t = cfg.tune
    rows = []
    for result in grid:
        m = result.metrics or {}
        found = TRIAL_DIR.search(os.path.basename(result.path or ""))
        trial_id = m.get("trial_id") or (found.group(1) if found else "?")
        params = {k.removeprefix("config/"): v for k, v in (result.config or {}).items()}
        trial = runs.Run(cfg.output_dir).trial(trial_id)
        final = trial.train_final
        finished = storage.exists(trial.train_meta)
        value = m.get(t.metric)
        ran = steps_run(runs.Run(cfg.output_dir), trial_id)
        rows.append({
            "trial_id": trial_id,
            "index": int(found.group(2)) if found else None,  # creation order
            "status": "error" if result.error else ("finished" if finished else "stopped early"),
            **{k: decode(v) for k, v in params.items()},
            t.metric: value if isinstance(value, (int, float)) and math.isfinite(value) else None,
            "best_val_loss": m.get("best_val_loss"),
            "steps": m.get("step"),
            "steps_run": max(ran, m.get("step") or 0),
            "reports": m.get("training_iteration"),
            "final_model": final if finished else None,
            "error": (str(result.error).strip().splitlines() or [""])[-1][:500] if result.error else None,
        })
    sign = 1 if t.mode == "min" else -1
    rows.sort(key=lambda r: (r["status"] != "finished", r[t.metric] is None, sign * (r[t.metric] or 0)))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def steps_run(run: runs.Run, trial_id: str) -> int:
    """Optimizer steps a trial really ran, from its metrics.jsonl: a stopped trial may have
    trained past its last result (see `sweep.step_budget`)."""
    metrics_path = run.trial(trial_id).train_metrics
    if not storage.exists(metrics_path):
        return 0
    lines = storage.read_text(metrics_path).splitlines()
    return int(json.loads(lines[-1])["step"]) if lines else 0


def summarize(cfg: RaylabConfig, grid, seconds: float) -> dict:
    """Rank the trials, write best.yaml, the analysis and results.json|csv; the summary."""
    t = cfg.tune
    run = runs.Run(cfg.output_dir)
    best_yaml = run.tune_file("best")
    rows = rows_of(cfg, grid)
    keys = list(t.search_space)
    winner = next((r for r in rows if r["status"] == "finished" and r[t.metric] is not None), None)
    summary: dict[str, Any] = {
        "metric": t.metric, "mode": t.mode, "searcher": t.searcher, "asha": bool(t.asha),
        "trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "steps_spent": sum(r["steps_run"] for r in rows), "seconds": round(seconds, 1),
        "best": None, "results": rows,
    }
    if winner:
        best_raw = with_params(json.loads(cfg.model_dump_json()), {k: winner[k] for k in keys}, cfg.output_dir)
        best_cfg = config.load_dict(best_raw)
        header = (f"# the winner of the sweep in {run.tune} (trial {winner['trial_id']}, {t.metric} {winner[t.metric]:.4f});\n"
                  f"# re-run with: raylab train THIS_FILE  (trains in {run.train})\n")
        storage.write_text(best_yaml, header + config.to_yaml(best_cfg))
        summary["best"] = {"trial_id": winner["trial_id"], "params": {k: winner[k] for k in keys},
                           t.metric: winner[t.metric], "final_model": winner["final_model"],
                           "config": best_yaml}
    summary["analysis"] = write(run, rows, t.search_space, t.metric, t.mode)
    result = runs.SweepResult.model_validate(summary)
    runs.write_json(run.tune_file("results"), result)
    storage.write_text(run.tune_file("results_csv"), _csv(rows, keys, t.metric))
    log.info(table(rows, keys, t.metric))
    if winner:
        log.info(f"tune: best trial {winner['trial_id']}: {t.metric} {winner[t.metric]:.4f} with "
            + ", ".join(f"{k}={winner[k]}" for k in keys) + f" -> {best_yaml}")
    else:
        raise UserError(f"no trial of the sweep finished ({summary['errors']} failed); see {run.tune_file('results')}")
    return result.model_dump(mode="json")


def _csv(rows: list[dict], keys: list[str], metric: str) -> str:
    cols = ["rank", "trial_id", "status", *keys, metric, "best_val_loss", "steps", "steps_run", "final_model", "error"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return out.getvalue()


def table(rows: list[dict], keys: list[str], metric: str) -> str:
    cols = ["rank", "trial_id", "status", *keys, metric, "steps"]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    grid = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in grid]
    errors = [f"  {r['trial_id']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(lines + (["errors:"] + errors if errors else []))
