"""What a sweep learned about its knobs: hyperparameter importance, partial dependence and
Optuna's slice plot, each as a PNG and as numbers in JSON.

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

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from raylab import storage

GRID = 25


def _usable(rows: list[dict], metric: str) -> list[dict]:
    return [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]


def study_of(rows: list[dict], space: dict, metric: str, mode: str):
    import optuna

    from raylab.tune import _encode, distributions

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = distributions(space)
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for r in _usable(rows, metric):
        params = {k: _encode(r[k]) for k in space}
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

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "plot.png")
        fig = draw(plt)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        storage.write_bytes(location, Path(path).read_bytes())


def write(tune_dir: str, rows: list[dict], space: dict, metric: str, mode: str) -> dict[str, Any]:
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
    storage.write_text(storage.join(tune_dir, "importance.json"),
                       json.dumps({"evaluator": "PED-ANOVA (optuna default)" if len(space) > 1 else "single parameter",
                                   "metric": metric, "trials": len(usable), "importance": importance}, indent=2) + "\n")
    storage.write_text(storage.join(tune_dir, "partial_dependence.json"),
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

    _png(storage.join(tune_dir, "importance.png"), draw_importance)
    _png(storage.join(tune_dir, "partial_dependence.png"), draw_pd)
    _png(storage.join(tune_dir, "slice.png"), draw_slice)
    return {"importance": importance, "partial_dependence_for": top,
            "files": ["importance.json", "importance.png", "partial_dependence.json", "partial_dependence.png", "slice.png"]}
