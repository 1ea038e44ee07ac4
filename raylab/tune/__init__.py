"""The tune stage (`raylab tune`): a sweep of train-stage runs with Ray Tune, Optuna and ASHA.

    from raylab.tune import run_tune
    summary = run_tune(cfg)            # writes <output_dir>/tune/ (see sweep.py)

Modules: sweep (the Tuner, one trial, the step budget), space (search space -> Optuna
distributions and trial configs), asha (ASHA's decisions reaching the workers at the rung),
report (ranked results, best.yaml, importance and partial dependence).
"""

from __future__ import annotations

from raylab.tune.sweep import run_tune

__all__ = ["run_tune"]
