"""The `tune:` section: the search space, the searcher, ASHA and the budgets."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from raylab.config.types import PositiveInt, Section, invalid


class SearchDim(Section):
    """Exactly one of: loguniform [lo, hi], uniform [lo, hi], randint [lo, hi), choice [...]."""

    loguniform: tuple[float, float] | None = Field(None, description="[low, high], sampled on a log scale")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]")
    randint: tuple[int, int] | None = Field(None, description="[low, high): integers")
    choice: list[Any] | None = Field(None, description="the values to choose from")

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDim:
        set_ = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise invalid(f"give exactly one of loguniform, uniform, randint, choice (got {set_ or 'none'})")
        kind = set_[0]
        value = getattr(self, kind)
        if kind == "choice":
            if not value:
                raise invalid("choice needs at least one value")
        elif not value[0] < value[1]:
            raise invalid(f"{kind} range [{value[0]}, {value[1]}] is empty; expected low < high")
        elif kind == "loguniform" and value[0] <= 0:
            raise invalid(f"loguniform needs a positive lower bound, got {value[0]}")
        return self


class AshaConfig(Section):
    """ASHA early stopping on the metric, at rungs grace_period * reduction_factor**k steps."""

    grace_period: PositiveInt = Field(1, description="steps before the first rung (put it at an eval step)")
    reduction_factor: float = Field(2.0, gt=1, description="a rung keeps the top 1/reduction_factor")


class TuneConfig(Section):
    """`raylab tune`: a sweep of train-stage runs (Optuna + ASHA on Ray Tune)."""

    search_space: dict[str, SearchDim] = Field(min_length=1, description="dotted config keys -> distributions")
    num_samples: PositiveInt = Field(8, description="trials")
    metric: str = Field("val_loss", description="what the sweep optimises")
    mode: Literal["min", "max"] = Field("min", description="minimise or maximise the metric")
    searcher: Literal["tpe", "random"] = Field("tpe", description="Optuna's TPE or random sampler")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="parameter sets to try first (e.g. the current defaults), keys from search_space")
    startup_trials: PositiveInt | None = Field(
        None, description="random trials before TPE models the results; default max(2, min(10, num_samples // 3))")
    seed: int = Field(0, description="seed of the sampler")
    max_concurrent_trials: PositiveInt | None = Field(None, description="trials running at once; default: what the cluster fits")
    cpus_per_trial_driver: float = Field(0.25, gt=0, description="Ray CPUs of each trial's driver")
    asha: AshaConfig | None = Field(default_factory=AshaConfig, description="early stopping; null turns it off")
    time_budget_s: float | None = Field(None, gt=0, description="wall-clock budget of the sweep")
    max_total_steps: PositiveInt | None = Field(None, description="optimizer steps the whole sweep may spend")
