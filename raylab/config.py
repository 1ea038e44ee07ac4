"""The job description: pydantic models for every config section, and `load`.

    cfg = load("configs/quickstart.yaml", ["train.lr=1e-4", "data.sources.0.path=x.jsonl"])

Rules (DESIGN.md, "Contracts"): unknown keys are errors; an override's value is read as a
YAML scalar or flow collection and then coerced by the schema; list items are addressed by
index; an override may create a section absent from the file; relative paths are made
absolute against the current directory at load time (Ray workers change directory);
`${env:NAME}` secrets stay references in the model and in every written config and are
expanded only where they are used (`expand_env`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from raylab import config_report
from raylab.errors import ConfigError, UserError
from raylab.overrides import apply_override, parse_override

SCHEMA_VERSION = 1
ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


# ---------------------------------------------------------------- value types


def _is_uri(value: str) -> bool:
    return "://" in value


def _absolute(value: str | None) -> str | None:
    """Local paths become absolute; URIs (s3://, gs://, file://) and env refs stay as given."""
    if value is None or _is_uri(value) or "${" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def _model_ref(value: str) -> str:
    """`preset:NAME` and hub ids stay; anything that looks like or is a local path is made
    absolute, so a saved adapter's base path still resolves from another directory."""
    if value.startswith("preset:") or _is_uri(value) or "${" in value:
        return value
    looks_local = value.startswith(("/", "./", "../", "~")) or os.path.exists(value)
    return os.path.abspath(os.path.expanduser(value)) if looks_local else value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


PathOrUri = Annotated[str, AfterValidator(_absolute)]
ModelRef = Annotated[str, AfterValidator(_model_ref)]
StrList = Annotated[list[str], BeforeValidator(_as_list)]
PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- sections


class RayConfig(Section):
    """How raylab reaches Ray (precedence: --address, RAY_ADDRESS, this, embedded local)."""

    address: str | None = Field(None, description="'auto', 'HOST:PORT', 'ray://HOST:10001' or null (embedded)")
    num_cpus: float | None = Field(
        None, gt=0, description="logical CPUs of the embedded Ray; default max(4, 2 x cores)"
    )
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the embedded Ray; default: detected")
    auth: Literal["token", "disabled"] | None = Field(
        None, description="token authentication; default $RAY_AUTH_MODE, else token"
    )
    dashboard: bool = False
    namespace: str = "raylab"


Format = Literal["completion", "instruction", "chat"]


class Fields(Section):
    """Where each part of a record lives in the source (field or column names)."""

    text: str = Field("text", description="completion text")
    prompt: str = Field("prompt", description="instruction prompt")
    response: str = Field("response", description="instruction response")
    system: str | None = Field(None, description="optional system message")
    context: str | None = Field(None, description="optional context appended to the prompt")
    messages: str = Field("messages", description="chat: OpenAI-style [{role, content}]")
    id: str | None = Field(None, description="a field holding a stable record id (a primary key)")


class _SourceBase(Section):
    name: str | None = Field(None, description="label in counts and quarantine; default source<N>")
    format: Format | None = Field(None, description="default data.format")
    fields: Fields | None = Field(None, description="default data.fields")


class FileSource(_SourceBase):
    """jsonl/json/csv/parquet files, or `text`: a directory of .txt/.md documents (one per
    file, always completion format)."""

    type: Literal["jsonl", "json", "parquet", "csv", "text"]
    path: PathOrUri = Field(description="a file, a directory or a glob")


class SqlSource(_SourceBase):
    type: Literal["sql"]
    url: str = Field(description="sqlite:///path/file.db, or ${env:NAME} holding a postgresql:// URL")
    query: str


class HttpSource(_SourceBase):
    """A paginated JSON API: page numbers (`page_param`) or cursors (`cursor_param`)."""

    type: Literal["http"]
    url: str
    records_path: str = Field("", description="dotted path to the record list in a response; '' = the body")
    page_param: str | None = Field(None, description="query parameter for the page number")
    start_page: int = 1
    cursor_param: str | None = Field(None, description="query parameter for the cursor")
    next_cursor_path: str | None = Field(None, description="dotted path to the next cursor in a response")
    headers: dict[str, str] = Field(default_factory=dict, description="values may be ${env:NAME}")
    max_pages: PositiveInt = 10_000
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _paging(self) -> HttpSource:
        if self.page_param and self.cursor_param:
            raise ValueError("give page_param or cursor_param, not both")
        if self.cursor_param and not self.next_cursor_path:
            raise ValueError("cursor_param needs next_cursor_path (where a response names the next cursor)")
        return self


Source = Annotated[FileSource | SqlSource | HttpSource, Field(discriminator="type")]


class ValidationConfig(Section):
    """Rules every record must pass; a record that fails goes to the quarantine."""

    required: StrList = Field(default_factory=list, description="extra fields every record must have")
    min_chars: int = Field(1, ge=0)
    max_chars: PositiveInt = 200_000
    roles: StrList = Field(default_factory=lambda: ["system", "user", "assistant"])
    deny_regex: StrList = Field(default_factory=list, description="a record matching any is rejected")
    max_tokens: PositiveInt | None = Field(None, description="default data.max_seq_len")
    over_max_tokens: Literal["reject", "truncate"] = "reject"
    max_rejected_fraction: Fraction | None = Field(None, description="fail the stage above this")

    @model_validator(mode="after")
    def _compiles(self) -> ValidationConfig:
        for pattern in self.deny_regex:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"deny_regex {pattern!r} is not a valid regular expression: {e}") from None
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self


class CleanConfig(Section):
    unicode: Literal["NFC", "NFKC"] | None = Field("NFC", description="Unicode normal form, or null to keep")
    whitespace: bool = Field(True, description="unify line ends, drop control and zero-width characters, trim")


class PiiConfig(Section):
    enabled: bool = True
    types: StrList | None = Field(None, description="detectors to run; default all (raylab.pii.available())")

    @model_validator(mode="after")
    def _known(self) -> PiiConfig:
        from raylab import pii

        if self.types is not None:
            unknown = [t for t in self.types if t not in pii.available()]
            if unknown:
                raise ValueError(f"unknown PII types {unknown}; expected some of {pii.available()}")
        return self


class DedupConfig(Section):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity for near duplicates")
    num_perm: PositiveInt = 64
    bands: PositiveInt = 16
    ngram: PositiveInt = Field(5, description="character shingle length")

    @model_validator(mode="after")
    def _bands(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class DataConfig(Section):
    sources: list[Source] = Field(min_length=1, description="at least one source")
    format: Format = "completion"
    fields: Fields = Field(default_factory=Fields)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    max_seq_len: PositiveInt = Field(512, description="tokens per training sequence (packed or padded)")
    packing: Literal["pack", "pad"] = Field("pack", description="pack documents into sequences, or pad each")
    train_on_prompt: bool = Field(False, description="labels cover prompts too, not only responses")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    seed: int = 0
    cpus_per_task: float = Field(0.25, gt=0, description="CPUs per Ray Data task")
    tokenizer_actors: PositiveInt = Field(2, description="most tokenizer actors at once")


class LoraConfig(Section):
    r: PositiveInt = 8
    alpha: float = Field(16.0, gt=0)
    dropout: Fraction = 0.05
    target_modules: StrList = Field(default_factory=lambda: ["all-linear"])
    modules_to_save: StrList = Field(default_factory=list)


class ModelConfig(Section):
    name_or_path: ModelRef = Field(description="a hub id, a local directory or preset:NAME")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["eager", "sdpa"] | None = None
    trust_remote_code: bool = False
    chat_template: PathOrUri | None = Field(None, description="a Jinja file replacing the tokenizer's template")
    method: Literal["lora", "dora", "full", "hybrid", "qlora"] = Field(
        "lora", description="lora | dora | full | hybrid (LoRA + lora.modules_to_save trained in full) | qlora (GPU + bitsandbytes)")
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _modules_to_save(self) -> ModelConfig:
        if self.method == "hybrid" and not self.lora.modules_to_save:
            raise ValueError("method: hybrid trains model.lora.modules_to_save in full; name at least one module (e.g. [embed_tokens])")
        if self.method != "hybrid" and self.lora.modules_to_save:
            raise ValueError(f"model.lora.modules_to_save is only used by method: hybrid (method is {self.method})")
        return self


class TrainConfig(Section):
    num_workers: PositiveInt | tuple[PositiveInt, PositiveInt] = Field(1, description="workers, or [min, max] for elastic training")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    torch_threads: PositiveInt | None = Field(None, description="per worker; default: cores / concurrent workers")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 8
    eval_batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    warmup_ratio: Fraction = 0.03
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    eval_every: PositiveInt = 50
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt | None = Field(None, description="default: train.eval_every")
    keep_checkpoints: PositiveInt = Field(2, description="best K by val_loss (the latest is always kept too)")
    early_stopping_patience: PositiveInt | None = Field(None, description="evals without val_loss improvement before stopping")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPUs that support it, else fp32")
    gradient_checkpointing: bool = False
    loss_on: Literal["targets", "all"] = Field("targets", description="all: every token is a target, prompts too")
    max_failures: int = Field(0, ge=-1)
    resume: bool = Field(True, description="continue from the run's latest checkpoint; false starts over")

    @model_validator(mode="after")
    def _elastic(self) -> TrainConfig:
        if isinstance(self.num_workers, tuple) and self.num_workers[0] > self.num_workers[1]:
            raise ValueError(f"train.num_workers [min, max] = {list(self.num_workers)}: min must not exceed max")
        return self

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers


class PretrainConfig(Section):
    """Continued pre-training before fine-tuning: a full fine-tune of model.name_or_path on
    every token of the data stage's train split; its result is then the base model of train,
    tune and eval (`raylab run` runs it after the data stage)."""

    max_steps: PositiveInt = 200
    lr: float = Field(3e-3, gt=0)
    batch_size: PositiveInt = 8
    num_workers: PositiveInt = 1
    cpus_per_worker: float = Field(1.0, gt=0)


class SearchDim(Section):
    """Exactly one of: loguniform [lo, hi], uniform [lo, hi], randint [lo, hi), choice [...]."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDim:
        set_ = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, randint, choice (got {set_ or 'none'})")
        kind = set_[0]
        value = getattr(self, kind)
        if kind == "choice":
            if not value:
                raise ValueError("choice needs at least one value")
        elif not value[0] < value[1]:
            raise ValueError(f"{kind} range [{value[0]}, {value[1]}] is empty; expected low < high")
        elif kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs a positive lower bound, got {value[0]}")
        return self


class AshaConfig(Section):
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(2.0, gt=1)


class TuneConfig(Section):
    search_space: dict[str, SearchDim] = Field(min_length=1)
    num_samples: PositiveInt = 8
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    searcher: Literal["tpe", "random"] = "tpe"
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="parameter sets to try first (e.g. the current defaults), keys from search_space")
    startup_trials: PositiveInt | None = Field(
        None, description="random trials before TPE models the results; default max(2, min(10, num_samples // 3))")
    seed: int = 0
    max_concurrent_trials: PositiveInt | None = Field(None, description="default: what the cluster fits")
    cpus_per_trial_driver: float = Field(0.25, gt=0)
    asha: AshaConfig | None = Field(default_factory=AshaConfig)
    time_budget_s: float | None = Field(None, gt=0, description="wall-clock budget of the sweep")
    max_total_steps: PositiveInt | None = Field(None, description="optimizer steps the whole sweep may spend")


class GoldenPrompt(Section):
    """A prompt whose greedy answer must contain a string and/or match a regex (re.search)."""

    prompt: str = Field(min_length=1)
    contains: str | None = None
    regex: str | None = None
    max_new_tokens: PositiveInt = 48

    @model_validator(mode="after")
    def _checkable(self) -> GoldenPrompt:
        if self.contains is None and self.regex is None:
            raise ValueError("give contains and/or regex: what the answer must have")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} does not compile: {e}") from None
        return self


class GatesConfig(Section):
    max_val_loss: float | None = None
    max_perplexity: float | None = None
    max_regression: float | None = Field(None, ge=0, description="allowed val-loss increase over production")
    golden: list[GoldenPrompt] = Field(default_factory=list)


class RegistryConfig(Section):
    enabled: bool = Field(True, description="log runs to MLflow and register winners")
    tracking_uri: str | None = Field(None, description="default $MLFLOW_TRACKING_URI, else SQLite under $RAYLAB_HOME")
    artifact_location: str | None = Field(None, description="artifact root of new experiments (s3://bucket/mlflow); "
                                          "default: beside the SQLite store, or the MLflow server's")
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=200,
                                   description="default: the run name")
    gates: GatesConfig = Field(default_factory=GatesConfig)
    auto_promote: bool = False


class EvalConfig(Section):
    """`raylab eval` and the gates: batch inference in a Ray Data actor pool."""

    max_samples: PositiveInt = Field(64, description="held-out records answered for exact match / ROUGE-L")
    max_new_tokens: PositiveInt = 64
    batch_size: PositiveInt = 8
    actors: PositiveInt = Field(1, description="model copies in the actor pool")
    cpus_per_actor: float = Field(1.0, gt=0)
    show_samples: int = Field(5, ge=0, description="side-by-side answers in the report")


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of the Generator deployment."""

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle")
    max_replicas: PositiveInt = Field(1, description="replicas at most under load")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at start; default min_replicas")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests per replica it scales towards")
    upscale_delay_s: float = Field(10.0, ge=0, description="load must last this long before scaling up")
    downscale_delay_s: float = Field(60.0, ge=0, description="idle this long before scaling down")
    look_back_period_s: float = Field(30.0, gt=10, description="averaging window; above Serve's 10 s metrics interval")


class ServeConfig(Section):
    """`raylab serve`: the OpenAI-compatible endpoint (see README, Serving)."""

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 on clusters")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    max_ongoing_requests: PositiveInt = Field(8, description="per replica; above the autoscaling target")
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs per Generator replica (also its torch threads)")
    gpus_per_replica: float = Field(0.0, ge=0, description="Ray GPUs per Generator replica")
    max_batch_size: PositiveInt = Field(8, description="sequences decoded together; 1 turns batching off")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long arrivals wait to be admitted together")
    max_adapters_per_replica: PositiveInt = Field(4, description="versions kept loaded per replica (LRU)")
    max_prompt_tokens: PositiveInt = Field(2048, description="longer prompts are a 400")
    max_tokens: PositiveInt = Field(512, description="largest max_tokens a request may ask (400 beyond)")
    max_request_bytes: PositiveInt = Field(1_000_000, description="larger request bodies are a 400")
    api_keys_env: str | None = Field(None, description="env variable with comma-separated API keys (Bearer)")
    api_keys_file: PathOrUri | None = Field(None, description="file with one API key per line (Bearer)")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        a = self.autoscaling
        if a.min_replicas > a.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({a.min_replicas}) > max_replicas ({a.max_replicas})")
        if self.max_ongoing_requests <= a.target_ongoing_requests:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be above "
                f"autoscaling.target_ongoing_requests ({a.target_ongoing_requests})"
            )
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size "
                             f"({self.max_batch_size}), or a replica never holds a full batch")
        return self


class RaylabConfig(Section):
    version: Literal[1] = Field(description=f"the config schema version; this raylab reads {SCHEMA_VERSION}")
    output_dir: PathOrUri = Field(description="the run directory; default runs/<config stem>")
    offline: bool = Field(False, description="set HF_HUB_OFFLINE=1 for everything raylab starts")
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig | None = None
    pretrain: PretrainConfig | None = None
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    _source: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _search_space_keys(self) -> RaylabConfig:
        if self.tune is not None:
            bad = [k for k in self.tune.search_space if not config_report.is_schema_path(type(self), k.split("."))]
            if bad:
                raise ValueError(f"tune.search_space: unknown config keys {bad}")
            for i, point in enumerate(self.tune.points_to_evaluate):
                if set(point) != set(self.tune.search_space):
                    raise ValueError(f"tune.points_to_evaluate.{i}: give exactly the search_space keys "
                                     f"{sorted(self.tune.search_space)}, got {sorted(point)}")
        return self

    @property
    def run_name(self) -> str:
        return self.output_dir.rstrip("/").rsplit("/", 1)[-1]

    @property
    def source(self) -> str | None:
        return self._source


# ---------------------------------------------------------------- loading


def read_yaml(path: str | os.PathLike) -> dict:
    """The raw mapping in a config file; every reading problem is a UserError naming the file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file not found: {path}")
    if p.is_dir():
        raise UserError(f"config path is a directory, expected a YAML file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{where}: YAML syntax error: {problem}") from None
    if raw is None:
        raise UserError(f"{path}: the config is empty; expected a mapping starting with `version: {SCHEMA_VERSION}`")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RaylabConfig:
    """Read, override, validate. Raises ConfigError listing every problem at once."""
    raw = read_yaml(path)
    cfg = load_dict(raw, overrides, source=str(path), stem=Path(path).stem)
    return cfg


def load_dict(
    raw: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "<config>", stem: str = "run"
) -> RaylabConfig:
    """Validate a config given as a mapping (the Python API's entry point)."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain YAML types only
    for item in overrides:
        apply_override(raw, *parse_override(item))
    raw.setdefault("output_dir", os.path.join("runs", stem))
    problems = _malformed_env_refs(raw)
    try:
        cfg = RaylabConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, config_report.problems(RaylabConfig, e, raw) + problems) from None
    if problems:
        raise ConfigError(source, problems)
    cfg._source = source
    return cfg


def _malformed_env_refs(raw: Any, path: str = "") -> list[str]:
    """`${env:NAME}` is the only reference form; catch `${ENV:x}`, `${env:}` and friends."""
    if isinstance(raw, dict):
        return [p for k, v in raw.items() for p in _malformed_env_refs(v, f"{path}{k}.")]
    if isinstance(raw, list):
        return [p for i, v in enumerate(raw) for p in _malformed_env_refs(v, f"{path}{i}.")]
    if isinstance(raw, str) and "${" in raw and ENV_REF.sub("", raw).count("${"):
        return [f"{path.rstrip('.')}: malformed reference in {raw!r}; expected ${{env:NAME}}"]
    return []


def env_refs(cfg: RaylabConfig) -> list[tuple[str, str]]:
    """(key path, variable) for every `${env:NAME}` reference in the config."""
    out = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}{i}.")
        elif isinstance(node, str):
            out.extend((path.rstrip("."), name) for name in ENV_REF.findall(node))

    walk(cfg.model_dump(mode="json"), "")
    return out


def expand_env(value: str, key: str) -> str:
    """Replace `${env:NAME}` references at the point of use; `key` names the config key."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise UserError(f"{key} references ${{env:{name}}} but the environment variable {name} is not set")
        return os.environ[name]

    return ENV_REF.sub(sub, value)


def to_yaml(cfg: RaylabConfig) -> str:
    """The resolved config as YAML: defaults filled, paths absolute, secrets still references."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_resolved(cfg: RaylabConfig) -> str:
    """Write `<output_dir>/config.resolved.yaml` (local path or URI) and return its location."""
    from raylab import storage

    header = f"# resolved by raylab from {cfg.source or 'a mapping'}; re-run with: raylab run THIS_FILE\n"
    return storage.write_text(storage.join(cfg.output_dir, "config.resolved.yaml"), header + to_yaml(cfg))
