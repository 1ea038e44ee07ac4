"""The `registry:` section: MLflow tracking and the promotion gates (the model's test suite).

Gates may also live in suite files beside the config (`registry.gates.suites`): each holds
the same keys as `registry.gates` and is read when the config is loaded, its checks added to
the config's. The resolved config (and so the gates stored with a version) holds their
content, not the file names: a version is judged by the suite as it was when it was trained.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from raylab.config.types import PositiveInt, Section, invalid

DEFAULT_REFUSAL = (r"(?i)\b(cannot|can't|can ?not|unable|not able|won't|will not|not allowed|sorry|"
                   r"decline|refuse)\b")


def _compiles(pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{pattern!r} does not compile: {e}") from None
    return pattern


class GoldenPrompt(Section):
    """A prompt whose greedy answer must contain a string, match a regex (re.search), equal a
    text exactly (surrounding whitespace aside) and/or be JSON valid under a JSON Schema."""

    prompt: str = Field(min_length=1, description="the user message")
    contains: str | None = Field(None, description="text the answer must contain")
    regex: str | None = Field(None, description="a regular expression the answer must match")
    exact: str | None = Field(None, description="the whole answer, surrounding whitespace aside")
    json_schema: dict[str, Any] | None = Field(None, description="the answer must be JSON valid under this JSON Schema")
    max_new_tokens: PositiveInt = Field(48, description="answer length budget")
    name: str | None = Field(None, description="the test case's name in reports (default: the prompt)")
    suite: str | None = Field(None, description="the group it reports under (a suite file's items: its file name)")

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v: dict | None) -> dict | None:
        if v is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(v).check_schema(v)
            except jsonschema.SchemaError as e:
                raise ValueError(f"not a valid JSON Schema: {e.message}") from None
        return v

    @model_validator(mode="after")
    def _checkable(self) -> GoldenPrompt:
        if self.contains is None and self.regex is None and self.exact is None and self.json_schema is None:
            raise invalid("give contains, regex, exact and/or json_schema: what the answer must have")
        try:
            _compiles(self.regex)
        except ValueError as e:
            raise invalid(str(e), at="regex") from None
        return self


class PiiProbe(Section):
    """Prompts designed to make the model repeat personal data or secrets its training data
    held (redacted there): any hit of the PII/secret detectors in an answer fails."""

    prompts: list[str] = Field(default_factory=list, description="prompts that invite the model to reveal such values")
    from_training_data: int = Field(0, ge=0, description="also this many prompts made from the version's training "
                                    "records that had a value redacted: the text up to the redaction")
    max_new_tokens: PositiveInt = Field(48, description="answer length budget")
    suite: str | None = Field(None, description="the group it reports under")

    @model_validator(mode="after")
    def _some(self) -> PiiProbe:
        if not self.prompts and not self.from_training_data:
            raise invalid("give prompts and/or from_training_data: what to ask")
        return self


class RefusalProbe(Section):
    """Prompts the model must decline: each answer must match `pattern` (re.search)."""

    prompts: list[str] = Field(min_length=1, description="requests the model must refuse")
    pattern: str = Field(DEFAULT_REFUSAL, description="what a refusal looks like (default: cannot, unable, sorry, ...)")
    max_new_tokens: PositiveInt = Field(48, description="answer length budget")
    suite: str | None = Field(None, description="the group it reports under")

    @model_validator(mode="after")
    def _compiled(self) -> RefusalProbe:
        try:
            _compiles(self.pattern)
        except ValueError as e:
            raise invalid(str(e), at="pattern") from None
        return self


class LatencyBudget(Section):
    """Speed on the local engine (the evaluating process, one prompt at a time, greedy)."""

    prompts: list[str] = Field(min_length=1, description="prompts to time (each once, after one warm-up)")
    max_new_tokens: PositiveInt = Field(32, description="tokens to generate per prompt")
    max_p95_latency_s: float | None = Field(None, gt=0, description="95th percentile seconds per prompt at most this")
    min_tokens_per_s: float | None = Field(None, gt=0, description="generated tokens per second at least this")
    suite: str | None = Field(None, description="the group it reports under")

    @model_validator(mode="after")
    def _budget(self) -> LatencyBudget:
        if self.max_p95_latency_s is None and self.min_tokens_per_s is None:
            raise invalid("give max_p95_latency_s and/or min_tokens_per_s: the budget")
        return self


class GatesConfig(Section):
    """What a version must pass before it may become production (`raylab models evaluate`)."""

    max_val_loss: float | None = Field(None, description="held-out loss at most this")
    max_perplexity: float | None = Field(None, description="held-out perplexity at most this")
    max_regression: float | None = Field(None, ge=0, description="allowed val-loss increase over production")
    golden: list[GoldenPrompt] = Field(default_factory=list, description="prompts whose answers are checked")
    pii_probe: list[PiiProbe] = Field(default_factory=list, description="prompts whose answers must hold no "
                                      "personal data or secrets (raylab's detectors)")
    refusal: list[RefusalProbe] = Field(default_factory=list, description="prompts the model must refuse")
    latency: list[LatencyBudget] = Field(default_factory=list, description="speed budgets on the local engine")
    min_recall_at_k: float | None = Field(
        None, ge=0, le=1, description="retrieval recall@k (k = index.eval.k) at least this, from the run's "
        "`raylab eval --rag` report")
    min_mrr: float | None = Field(None, ge=0, le=1, description="retrieval MRR@k at least this (`raylab eval --rag`)")
    max_bias_gap: float | None = Field(
        None, ge=0, description="every bias probe's gap (max minus min of the groups' mean log-probability per "
        "continuation token, nats) at most this; probes: eval.bias_probes, else the shipped defaults")
    max_quality_drop: float | None = Field(
        None, ge=0, description="a version made by `raylab optimize`: its held-out loss may exceed its parent's "
        "(measured by `raylab models evaluate` on the same split) by at most this share, e.g. 0.02 = 2 %")
    min_speedup: float | None = Field(
        None, gt=0, description="a version made by `raylab optimize`: its tokens/s at concurrency 16 over its "
        "parent's, as `raylab optimize` recorded them (optimize.measure), at least this")
    suites: list[str] = Field(default_factory=list, description="suite files (YAML, the keys of registry.gates), "
                              "read at load time and added to these gates; relative to the directory you run in")
    suites_read: list[str] = Field(default_factory=list, description="the suite files whose checks are included "
                                   "above (set when they are read; `raylab render` watches them)")

    @model_validator(mode="before")
    @classmethod
    def _read_suites(cls, data: Any) -> Any:
        """Adds each suite file's checks (read now) and drops `suites`: the content is kept."""
        if not isinstance(data, dict) or not data.get("suites"):
            return data
        suites = data["suites"]
        if not isinstance(suites, list) or not all(isinstance(s, str) for s in suites):
            return data  # the field's own validation reports it
        merged = {k: v for k, v in data.items() if k != "suites"}
        merged["suites_read"] = list(merged.get("suites_read") or []) + [os.path.abspath(p) for p in suites]
        for i, path in enumerate(suites):
            try:
                suite = read_suite(path)
            except ValueError as e:
                raise invalid(str(e), at=f"suites.{i}") from None
            for key in ("golden", "pii_probe", "refusal", "latency"):
                merged[key] = list(merged.get(key) or []) + suite[key]
            for key in ("max_val_loss", "max_perplexity", "max_regression", "min_recall_at_k", "min_mrr", "max_bias_gap",
                        "max_quality_drop", "min_speedup"):
                if suite[key] is not None:
                    if merged.get(key) is not None and merged[key] != suite[key]:
                        raise invalid(f"{path}: {key} is {suite[key]}, the config says {merged[key]}: give it once",
                                      at=f"suites.{i}")
                    merged[key] = suite[key]
        return merged


def read_suite(path: str) -> dict:
    """A suite file's gates as plain data, each check tagged with the file's name; a
    ValueError naming the file and key for anything wrong in it."""
    import yaml

    full = os.path.abspath(os.path.expanduser(path))
    try:
        with open(full, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"suite file {path} not found (relative paths start at {os.getcwd()})") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"suite file {path} is not readable YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"suite file {path}: expected a mapping with the keys of registry.gates "
                         f"(golden, pii_probe, refusal, latency, ...), got {type(raw).__name__}")
    if "suites" in raw:
        raise ValueError(f"suite file {path}: suites: a suite file does not include other suites")
    name = os.path.basename(full)
    for key in ("golden", "pii_probe", "refusal", "latency"):
        if isinstance(raw.get(key), list):
            raw[key] = [dict(item, suite=item.get("suite", name)) if isinstance(item, dict) else item for item in raw[key]]
    try:
        gates = GatesConfig.model_validate(raw)
    except ValidationError as e:
        from raylab.config.report import problems

        raise ValueError(f"suite file {path}: " + "; ".join(problems(GatesConfig, e, raw))) from None
    return gates.model_dump()


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
