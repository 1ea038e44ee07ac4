"""The `train:` and `pretrain:` sections."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from raylab.config.types import Fraction, PositiveInt, Section, invalid


class RemoteProviderConfig(Section):
    """An OpenAI-compatible fine-tuning service that trains instead of Ray Train
    (`train.provider: openai_compatible`): OpenAI, another raylab's `raylab api`, a vendor's
    compatible endpoint. The data stage runs here; its accepted, redacted records (train split,
    and val as the validation file) are uploaded as chat JSONL, the job is created and followed,
    and the result is registered as a remote version (raylab/train/remote.py). Needs
    governance.allow_remote: true; a source with contains_pii: true is never sent."""

    base_url: str = Field(description="the service's base URL, ending before /files and /fine_tuning "
                          "(https://api.openai.com/v1, http://HOST:PORT/v1)")
    api_key: str = Field(description="a ${env:NAME} reference to the bearer key (never the key itself)")
    model: str = Field(min_length=1, description="the provider's base model the job fine-tunes (the request's `model`)")
    suffix: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                               description="added to the fine-tuned model's name by the provider")
    n_epochs: Literal["auto"] | PositiveInt = Field("auto", description="the job's n_epochs hyper-parameter")
    batch_size: Literal["auto"] | PositiveInt = Field("auto", description="the job's batch_size hyper-parameter")
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0)] = Field(
        "auto", description="the job's learning_rate_multiplier hyper-parameter")
    validation: bool = Field(True, description="upload the data stage's val split as the job's validation_file")
    poll_s: float = Field(5.0, gt=0, description="seconds between reads of the job and its events")
    timeout_h: float = Field(24.0, gt=0, description="hours the job may take before raylab stops following it "
                             "(and cancels it at the provider)")
    request_timeout_s: float = Field(120.0, gt=0, description="seconds one request may take (an upload included)")
    max_retries: int = Field(4, ge=0, description="retries of a request answered 429 or 5xx, or whose connection failed")

    @field_validator("api_key")
    @classmethod
    def _env_reference(cls, value: str) -> str:
        if not (value.startswith("${env:") and value.endswith("}")):
            raise ValueError("give a ${env:NAME} reference to the key, not the key itself (configs are written to "
                             "run directories and the registry)")
        return value

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "${env:")):
            raise ValueError(f"expected http(s)://HOST[:PORT]/PATH, got {value!r}")
        return value.rstrip("/")


class TrainConfig(Section):
    """`raylab train`: Ray Train workers, the optimizer, evaluation, checkpoints."""

    num_workers: PositiveInt | tuple[PositiveInt, PositiveInt] = Field(1, description="workers, or [min, max] for elastic training")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers on nodes")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs per worker")
    torch_threads: PositiveInt | None = Field(None, description="torch threads per worker; default: cores / concurrent workers")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    epochs: PositiveInt = Field(1, description="passes over the train split (unless max_steps)")
    max_steps: PositiveInt | None = Field(None, description="optimizer steps; overrides epochs")
    batch_size: PositiveInt = Field(8, description="sequences per micro-batch per worker")
    eval_batch_size: PositiveInt = Field(8, description="sequences per evaluation batch per worker")
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step")
    warmup_ratio: Fraction = Field(0.03, description="share of the steps with a linear warmup")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay after warmup")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null turns it off")
    seed: int = Field(0, description="seed of initial adapters, dropout and shuffling")
    eval_every: PositiveInt = Field(50, description="steps between val-loss evaluations")
    log_every: PositiveInt = Field(10, description="steps between progress lines / metrics rows")
    checkpoint_every: PositiveInt | None = Field(None, description="steps between checkpoints; default: train.eval_every")
    keep_checkpoints: PositiveInt = Field(2, description="best K by val_loss (the latest is always kept too)")
    early_stopping_patience: PositiveInt | None = Field(None, description="evals without val_loss improvement before stopping")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPUs that support it, else fp32")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds the whole model (DistributedDataParallel); fsdp: parameters, gradients "
                           "and optimizer state sharded across the workers (FSDP2, per decoder layer; needs num_workers >= 2)")
    activation_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory); the old name gradient_checkpointing "
                           "is still accepted")
    objective: str = Field(
        "cross_entropy", description="the training loss, a name registered in raylab/train/objectives.py; cross_entropy: next-token cross-entropy; "
        "distill: cross-entropy mixed with the KL to a teacher (set by `raylab optimize` with optimize.distill)")
    loss_on: Literal["targets", "all"] = Field("targets", description="all: every token is a target, prompts too")
    provider: Literal["ray", "openai_compatible"] = Field(
        "ray", description="ray: Ray Train on this cluster; openai_compatible: a fine-tuning service (train.remote) "
                           "trains on the data stage's records, and its result is registered as a remote version")
    remote: RemoteProviderConfig | None = Field(None, description="the service train.provider openai_compatible sends jobs to")
    max_failures: int = Field(0, ge=-1, description="worker failures restarted from the latest checkpoint (-1: always)")
    resume: bool = Field(True, description="continue from the run's latest checkpoint; false starts over")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data):
        """train.gradient_checkpointing, the key's name before transformers (and raylab) called it
        activation checkpointing: configs written with it keep working."""
        if isinstance(data, dict) and "gradient_checkpointing" in data:
            data = dict(data)
            old = data.pop("gradient_checkpointing")
            if "activation_checkpointing" in data and data["activation_checkpointing"] != old:
                raise invalid(f"gradient_checkpointing={old} and activation_checkpointing={data['activation_checkpointing']} "
                              "are one setting under two names; keep activation_checkpointing only")
            data.setdefault("activation_checkpointing", old)
        return data

    @model_validator(mode="after")
    def _provider(self) -> TrainConfig:
        if self.provider == "openai_compatible" and self.remote is None:
            raise invalid("provider=openai_compatible needs train.remote {base_url, api_key: ${env:NAME}, model}",
                          at="remote")
        if self.provider == "ray" and self.remote is not None:
            raise invalid("train.remote is set but train.provider is ray; set train.provider: openai_compatible "
                          "or remove train.remote", at="remote")
        return self

    @model_validator(mode="after")
    def _elastic(self) -> TrainConfig:
        if isinstance(self.num_workers, tuple) and self.num_workers[0] > self.num_workers[1]:
            raise invalid(f"[min, max] is {list(self.num_workers)}: min must not exceed max", at="num_workers")
        if self.strategy == "fsdp" and self.min_workers < 2:
            workers = list(self.num_workers) if isinstance(self.num_workers, tuple) else self.num_workers
            # Refused rather than run as a no-op: one worker has nothing to shard with, and a
            # user asking for FSDP expects the memory it saves.
            raise invalid(f"strategy=fsdp shards the model across the workers, but num_workers={workers} "
                          "allows a single worker; set num_workers to 2 or more (a minimum of 2 if elastic), "
                          "or strategy=ddp", at="strategy")
        return self

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers


class CorpusTokenizerConfig(Section):
    """A byte-level BPE tokenizer trained on the corpus for a base built from scratch: trained by
    the data stage on its accepted, PII-redacted, deduplicated train split (never on raw
    sources), saved under <output_dir>/data/tokenizer/, then used to tokenize the shards and as
    the tokenizer of the preset the pretrain stage builds. The same corpus and settings give
    the same tokenizer (and fingerprint)."""

    vocab_size: int = Field(2048, ge=300, le=65536, description="tokens in the vocabulary, special and byte tokens included")
    min_frequency: PositiveInt = Field(2, description="a merge needs a pair seen at least this often")


class PretrainConfig(Section):
    """Continued pre-training before fine-tuning: a full fine-tune of model.name_or_path on
    every token of the data stage's train split; its result is then the base model of train,
    tune and eval (`raylab run` runs it after the data stage)."""

    max_steps: PositiveInt = Field(200, description="optimizer steps")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    batch_size: PositiveInt = Field(8, description="sequences per batch per worker")
    num_workers: PositiveInt = Field(1, description="Ray Train workers")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per worker")
    tokenizer: CorpusTokenizerConfig | None = Field(
        None, description="train a tokenizer on the redacted corpus and pre-train the preset from scratch with it "
                          "(model.name_or_path must be preset:NAME); default: the model's own tokenizer")
