"""The job description: one pydantic section per file, and `load`.

    from raylab import config
    cfg = config.load("configs/quickstart.yaml", ["train.lr=1e-4"])
    cfg.train.lr, cfg.data.sources[0].path, cfg.run_name

Sections (a file each): ray, data, model, train (+ pretrain), tune, registry, eval, serve, index,
synth, optimize, explain, platform; `load` reads YAML and applies overrides (load.py, overrides.py); `report` turns validation
errors into lines a user can act on; `docs` renders docs/config.md. This package imports no
stage: every stage imports it.
"""

from __future__ import annotations

from raylab.config.api import ApiConfig
from raylab.config.bias import BiasProbesConfig, BiasProbeSet, BiasTemplate
from raylab.config.data import (
    CleanConfig,
    DataConfig,
    DedupConfig,
    Fields,
    FileSource,
    Format,
    HttpSource,
    PiiConfig,
    Source,
    SqlSource,
    ValidationConfig,
)
from raylab.config.evaluate import EvalConfig, GlobalExplanationConfig
from raylab.config.explain import EXPLAIN_METHODS, SPAN_METHODS, ExplainConfig, InfluenceConfig
from raylab.config.governance import AuditConfig, CardConfig, GovernanceConfig
from raylab.config.index import AnnConfig, IndexConfig, RaftConfig, RagEvalConfig
from raylab.config.loading import (
    env_refs,
    load,
    load_dict,
    load_text,
    parse_yaml,
    read_yaml,
    to_yaml,
    write_resolved,
)
from raylab.config.model import LoraConfig, ModelConfig
from raylab.config.optimize import QUANTIZE_METHODS, MeasureConfig, OptimizeConfig, PruneConfig
from raylab.config.platform import CiConfig, CloudConfig, NodeGroup, PlatformConfig
from raylab.config.ray import RayConfig
from raylab.config.registry import (
    GatesConfig,
    GoldenPrompt,
    LatencyBudget,
    PiiProbe,
    RefusalProbe,
    RegistryConfig,
    read_suite,
)
from raylab.config.root import SCHEMA_VERSION, RaylabConfig
from raylab.config.serve import AutoscalingConfig, CanaryConfig, ExplainServeConfig, ServeConfig
from raylab.config.synth import (
    EndpointConfig,
    EvolInstructConfig,
    GroundedQaConfig,
    JudgeConfig,
    SelfInstructConfig,
    SynthConfig,
    SynthFiltersConfig,
)
from raylab.config.train import CorpusTokenizerConfig, PretrainConfig, TrainConfig
from raylab.config.tune import AshaConfig, SearchDim, TuneConfig
from raylab.config.types import Section
from raylab.core.secrets import ENV_REF, expand_env
from raylab.errors import ConfigError

__all__ = [
    "ENV_REF", "SCHEMA_VERSION", "AnnConfig", "ApiConfig", "AshaConfig", "AuditConfig", "AutoscalingConfig", "CardConfig", "CiConfig",
    "BiasProbeSet", "BiasProbesConfig", "BiasTemplate", "CleanConfig", "CloudConfig", "ConfigError",
    "CorpusTokenizerConfig", "DataConfig", "DedupConfig", "EndpointConfig", "EvalConfig", "GlobalExplanationConfig", "EvolInstructConfig", "JudgeConfig", "EXPLAIN_METHODS", "SPAN_METHODS", "InfluenceConfig",
    "CanaryConfig", "ExplainConfig", "ExplainServeConfig", "GroundedQaConfig", "SelfInstructConfig", "SynthConfig", "SynthFiltersConfig",
    "Fields", "FileSource", "Format", "GatesConfig", "GoldenPrompt", "GovernanceConfig", "HttpSource",
    "IndexConfig", "LatencyBudget", "LoraConfig", "MeasureConfig", "ModelConfig", "NodeGroup", "OptimizeConfig", "PiiConfig", "PiiProbe",
    "PlatformConfig", "PretrainConfig", "PruneConfig", "QUANTIZE_METHODS", "RaftConfig", "RagEvalConfig", "RayConfig", "RaylabConfig", "RefusalProbe",
    "RegistryConfig",
    "SearchDim", "Section", "ServeConfig", "Source", "SqlSource", "TrainConfig", "TuneConfig", "ValidationConfig",
    "env_refs", "expand_env", "load", "load_dict", "load_text", "parse_yaml", "read_suite", "read_yaml", "to_yaml", "write_resolved",
]
