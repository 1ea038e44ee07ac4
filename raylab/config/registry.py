"""The `registry:` section: MLflow tracking and the promotion gates."""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from raylab.config.types import PositiveInt, Section, invalid


class GoldenPrompt(Section):
    """A prompt whose greedy answer must contain a string and/or match a regex (re.search)."""

    prompt: str = Field(min_length=1, description="the user message")
    contains: str | None = Field(None, description="text the answer must contain")
    regex: str | None = Field(None, description="a regular expression the answer must match")
    max_new_tokens: PositiveInt = Field(48, description="answer length budget")

    @model_validator(mode="after")
    def _checkable(self) -> GoldenPrompt:
        if self.contains is None and self.regex is None:
            raise invalid("give contains and/or regex: what the answer must have")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise invalid(f"{self.regex!r} does not compile: {e}", at="regex") from None
        return self


class GatesConfig(Section):
    """What a version must pass before it may become production (`raylab models evaluate`)."""

    max_val_loss: float | None = Field(None, description="held-out loss at most this")
    max_perplexity: float | None = Field(None, description="held-out perplexity at most this")
    max_regression: float | None = Field(None, ge=0, description="allowed val-loss increase over production")
    golden: list[GoldenPrompt] = Field(default_factory=list, description="prompts whose answers are checked")


class RegistryConfig(Section):
    """Runs and model versions in MLflow; gates; promotion."""

    enabled: bool = Field(True, description="log runs to MLflow and register winners")
    tracking_uri: str | None = Field(None, description="default $MLFLOW_TRACKING_URI, else SQLite under $RAYLAB_HOME")
    artifact_location: str | None = Field(None, description="artifact root of new experiments (s3://bucket/mlflow); "
                                          "default: beside the SQLite store, or the MLflow server's")
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=200,
                                   description="the registered model's name in MLflow; default: the run name")
    gates: GatesConfig = Field(default_factory=GatesConfig, description="promotion gates, stored with each version")
    auto_promote: bool = Field(False, description="`raylab run` promotes a version that passes its gates")
    live_interval_s: float = Field(10.0, ge=0, description="seconds between the batches of training metrics the train "
                                   "driver sends to MLflow while a run goes; 0: only when it ends")
    system_metrics: bool = Field(True, description="while training, also log the driver node's CPU, memory, disk and "
                                 "network (GPU with pynvml) as MLflow system/* metrics; needs psutil")
