"""The search space: `tune.search_space`'s dotted config keys as Optuna distributions, and the
trial configs they make.

    distributions(cfg.tune.search_space)              # {key: optuna distribution}
    with_params(raw, {"train.lr": 1e-3}, trial_dir)    # a trial's config as a mapping
    space_problems(cfg, raw, steps_per_trial)          # every bad value, before the sweep starts
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from raylab import config
from raylab.config import RaylabConfig, SearchDim
from raylab.config.overrides import apply_override

MIN_TRIAL_SECONDS = 30  # measured fixed cost of one trial here (RAY_NOTES: ~25 s before any model work)


def encode(value: Any) -> Any:
    """Optuna choices must be scalars: a list or mapping choice travels as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def distributions(space: dict[str, SearchDim]) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, dim in space.items():
        if dim.loguniform:
            out[key] = FloatDistribution(*dim.loguniform, log=True)
        elif dim.uniform:
            out[key] = FloatDistribution(*dim.uniform)
        elif dim.randint:
            out[key] = IntDistribution(dim.randint[0], dim.randint[1] - 1)
        else:
            out[key] = CategoricalDistribution([encode(c) for c in dim.choice])
    return out


def with_params(raw: dict, params: dict[str, Any], output_dir: str) -> dict:
    """The base config (as a mapping) with a trial's parameters and run directory."""
    raw = yaml.safe_load(yaml.safe_dump(raw))
    for key, value in params.items():
        apply_override(raw, key, decode(value))
    raw["output_dir"] = output_dir
    raw.pop("tune", None)
    return raw


def space_problems(cfg: RaylabConfig, raw: dict, steps_per_trial: int) -> list[str]:
    """Every value a dimension can take must make a valid config: the bounds of a range and
    each choice are tried against the schema (wrong types, out-of-range values)."""
    problems = []
    for key, dim in cfg.tune.search_space.items():
        values = dim.choice if dim.choice is not None else list(dim.loguniform or dim.uniform or (dim.randint[0], dim.randint[1] - 1))
        for value in values:
            try:
                config.load_dict(with_params(raw, {key: value}, cfg.output_dir))
            except config.ConfigError as e:
                detail = "; ".join(p.split(": ", 1)[-1] for p in e.problems)
                problems.append(f"tune.search_space.{key}: the value {value!r} does not make a valid config: {detail}")
                break
    t = cfg.tune
    if t.max_total_steps is not None and t.max_total_steps < steps_per_trial:
        problems.append(f"tune.max_total_steps={t.max_total_steps} is less than one trial ({steps_per_trial} steps); "
                        "raise it or lower train.max_steps / train.epochs")
    if t.time_budget_s is not None and t.time_budget_s < MIN_TRIAL_SECONDS:
        problems.append(f"tune.time_budget_s={t.time_budget_s:g} cannot fit one trial: starting the trial, its "
                        f"Ray Train workers and the data stream alone takes about {MIN_TRIAL_SECONDS} s")
    return problems


