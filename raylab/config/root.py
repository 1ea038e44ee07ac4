"""`RaylabConfig`: the whole job description, one field per section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from raylab.config.api import ApiConfig
from raylab.config.data import DataConfig
from raylab.config.evaluate import EvalConfig
from raylab.config.explain import ExplainConfig
from raylab.config.governance import GovernanceConfig
from raylab.config.index import IndexConfig
from raylab.config.model import ModelConfig
from raylab.config.optimize import OptimizeConfig
from raylab.config.platform import PlatformConfig
from raylab.config.ray import RayConfig
from raylab.config.registry import RegistryConfig
from raylab.config.report import is_schema_path
from raylab.config.serve import ServeConfig
from raylab.config.synth import SynthConfig
from raylab.config.train import PretrainConfig, TrainConfig
from raylab.config.tune import TuneConfig
from raylab.config.types import PathOrUri, Section, invalid

SCHEMA_VERSION = 1


class RaylabConfig(Section):
    """One job: the run directory, then a section per stage."""

    version: Literal[1] = Field(description=f"the config schema version; this raylab reads {SCHEMA_VERSION}")
    extends: None = Field(None, description="another config file (a path relative to this one) whose keys this "
                          "file's are merged over, mappings key by key (configs/quickstart-governed.yaml); "
                          "resolved when a config file is read, so only a file may use it")
    output_dir: PathOrUri = Field(description="the run directory; default runs/<config stem>")
    offline: bool = Field(False, description="set HF_HUB_OFFLINE=1 for everything raylab starts")
    ray: RayConfig = Field(default_factory=RayConfig, description="how raylab reaches Ray")
    data: DataConfig = Field(description="the data stage")
    model: ModelConfig = Field(description="the base model and fine-tuning method")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the train stage")
    tune: TuneConfig | None = Field(None, description="a sweep; `raylab run` tunes instead of training when set")
    pretrain: PretrainConfig | None = Field(None, description="continued pre-training before fine-tuning")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow runs, versions, gates")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="batch evaluation")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the OpenAI-compatible endpoint")
    governance: GovernanceConfig = Field(default_factory=GovernanceConfig,
                                         description="the control-plane database and the audit log")
    index: IndexConfig = Field(default_factory=IndexConfig,
                               description="`raylab index`: documents chunked and embedded for retrieval")
    synth: SynthConfig = Field(default_factory=SynthConfig,
                               description="`raylab synth`: training examples generated through an endpoint, filtered")
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig,
                                     description="`raylab optimize`: quantised or pruned versions derived from a registered one")
    explain: ExplainConfig = Field(default_factory=ExplainConfig,
                                   description="`raylab explain`: token attributions of a registered version")
    api: ApiConfig = Field(default_factory=ApiConfig,
                           description="`raylab api`: the OpenAI-compatible fine-tuning service (files, jobs)")
    platform: PlatformConfig = Field(default_factory=PlatformConfig,
                                     description="the cluster and CI pipeline `raylab render` writes files for")

    _source: str | None = PrivateAttr(None)

    @field_validator("extends", mode="before")
    @classmethod
    def _extends_only_in_files(cls, value):
        if value is not None:
            raise ValueError(f"{value!r} was not merged: extends works in a config file raylab reads by path "
                             "(raylab run FILE), not in YAML text or a Python mapping")
        return value

    @model_validator(mode="after")
    def _search_space_keys(self) -> RaylabConfig:
        if self.tune is not None:
            bad = [k for k in self.tune.search_space if not is_schema_path(type(self), k.split("."))]
            if bad:
                raise invalid(f"unknown config keys {bad}", at="tune.search_space")
            for i, point in enumerate(self.tune.points_to_evaluate):
                if set(point) != set(self.tune.search_space):
                    raise invalid(f"give exactly the search_space keys {sorted(self.tune.search_space)}, "
                                  f"got {sorted(point)}", at=f"tune.points_to_evaluate.{i}")
        for i, override in enumerate(self.platform.overrides):
            key = override.split("=", 1)[0]
            if not is_schema_path(type(self), key.split(".")):
                raise invalid(f"{key}: not a config key", at=f"platform.overrides.{i}")
        return self

    @model_validator(mode="after")
    def _corpus_tokenizer_needs_a_preset(self) -> RaylabConfig:
        # A pre-trained model's embeddings belong to its own tokenizer; only a preset, built
        # from scratch with random weights, can take a new one.
        if self.pretrain is not None and self.pretrain.tokenizer is not None and not self.model.name_or_path.startswith("preset:"):
            raise invalid(f"a tokenizer trained on the corpus needs a base built from scratch, but model.name_or_path is "
                          f"{self.model.name_or_path!r}; use a preset (preset:tiny-llama) or remove pretrain.tokenizer",
                          at="pretrain.tokenizer")
        return self

    @model_validator(mode="after")
    def _endpoint_oidc_needs_an_issuer(self) -> RaylabConfig:
        if self.serve.oidc and self.governance.oidc is None:
            raise invalid("the endpoint cannot verify OIDC tokens without an issuer: add governance.oidc (issuer, "
                          "audience, jwks_url or jwks_file), or set serve.oidc: false", at="serve.oidc")
        return self

    @model_validator(mode="after")
    def _service_callers_reach_their_models(self) -> RaylabConfig:
        # The service in the ingress knows its callers by control-plane keys. An endpoint that
        # asks for keys but not those would answer their own `ft:` models with a 401 (and a
        # static key, which has no organisation, with model_not_found): refuse the pair here.
        s = self.serve
        if self.api.enabled and (s.api_keys_env or s.api_keys_file or s.oidc) and not s.api_keys_db:
            raise invalid("api.enabled puts the fine-tuning service in this endpoint, whose callers use the keys "
                          "`raylab keys create` made, but the endpoint accepts only serve.api_keys_env/api_keys_file/"
                          "oidc: they could not use the models they fine-tune; set serve.api_keys_db: true, or run "
                          "the service apart (`raylab api --standalone`, api.enabled: false)", at="serve.api_keys_db")
        return self

    @model_validator(mode="after")
    def _remote_provider(self) -> RaylabConfig:
        if self.train.provider == "ray":
            return self
        # Sending the company's records to a provider is a governance decision, made in the
        # config where it is reviewed, whatever host the URL names (a loopback URL may be a
        # tunnel). The other refusals are stages that need the weights, which stay remote.
        if not self.governance.allow_remote:
            raise invalid(f"provider=openai_compatible uploads the data stage's records to {self.train.remote.base_url}, "
                          "and governance.allow_remote is false (the default); set governance.allow_remote: true to "
                          "allow it, or train.provider: ray", at="train.provider")
        for key, section in (("tune", self.tune), ("pretrain", self.pretrain)):
            if section is not None:
                raise invalid(f"a {key} section runs on this cluster's Ray and needs the model's weights; a remote "
                              "provider trains elsewhere: remove it, or set train.provider: ray", at=key)
        if any(m is not None for m in (self.optimize.quantize, self.optimize.prune, self.optimize.distill)):
            raise invalid("optimize derives a version from the weights, which stay at the remote provider; "
                          "turn optimize off, or set train.provider: ray", at="optimize")
        sources = [(i, s) for i, s in enumerate(self.data.sources)
                   if (s.format or self.data.format) == "completion" or s.type == "text"]  # text: always completion
        if sources:
            i, s = sources[0]
            raise invalid(f"an OpenAI-compatible provider trains on chat examples, but data.sources.{i} "
                          f"({s.name or f'source{i}'}) is in completion format; set its format (or data.format) "
                          "to chat or instruction, or train.provider: ray", at=f"data.sources.{i}.format")
        return self

    @property
    def run_name(self) -> str:
        return self.output_dir.rstrip("/").rsplit("/", 1)[-1]

    @property
    def source(self) -> str | None:
        return self._source
