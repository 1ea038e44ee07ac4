"""The `explain:` section: limits and defaults of `raylab explain CONFIG --model REF --prompt ...`
(token attributions for a registered version, docs/explain.md).

    explain:
      method: integrated_gradients   # feature_ablation | shapley_sampling | shap
      n_steps: 64                    # integrated gradients: points on the path from the baseline
      samples: 25                    # shapley_sampling: random feature orders
      evals: 500                     # shap: model evaluations of its partition explainer
      max_prompt_tokens: 256         # beyond it: exit 2 naming this key
      max_target_tokens: 32          # also the length of the greedy answer explained by default
      influence:                     # `raylab explain --influence`: which training records shaped the answer
        top_k: 5
        checkpoints: all             # all | final | checkpoint names or steps, comma-separated
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylab.config.types import PositiveInt, Section

EXPLAIN_METHODS = ("integrated_gradients", "feature_ablation", "shapley_sampling", "shap")
# the methods whose features can be spans of the prompt (sentences, given offsets) instead of tokens
SPAN_METHODS = ("feature_ablation", "shapley_sampling")


class InfluenceConfig(Section):
    """`raylab explain --influence`: TracIn-style scores of the training records for an answer
    (gradient dot products on the LoRA parameters at saved checkpoints; an approximation)."""

    top_k: PositiveInt = Field(5, description="training records returned, highest score first")
    checkpoints: str = Field(
        "all", min_length=1, description="which saved checkpoints of the version's training run to sum over: all, final (the "
        "version's own weights only: plain gradient similarity), or checkpoint directory names or steps, "
        "comma-separated (e.g. 12,24)")
    normalize: bool = Field(False, description="rank by the cosine of the gradients instead of their dot product "
                            "(discounts records whose gradient is merely large: outliers, long documents)")
    actors: PositiveInt = Field(2, description="Ray Data actors scoring the training shards (each loads the model once)")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPUs per actor; also its torch threads (at least 1)")
    batch_size: PositiveInt = Field(16, description="packed training rows per Ray Data batch")


class ExplainConfig(Section):
    """`raylab explain`: which input tokens each output token's log-probability came from."""

    method: Literal["integrated_gradients", "feature_ablation", "shapley_sampling", "shap"] = Field(
        "integrated_gradients", description="integrated_gradients (captum LayerIntegratedGradients on the input "
        "embeddings, per output token, with its convergence delta), feature_ablation (each input token replaced "
        "by the baseline token, one at a time), shapley_sampling (Shapley values over random token orders) or "
        "shap (shap's TeacherForcing and Text masker, partition explainer: needs shap, Python >= 3.11)")
    n_steps: PositiveInt = Field(64, description="integrated_gradients: steps of the Riemann sum from the "
                                 "baseline to the input; more steps, smaller convergence delta")
    samples: PositiveInt = Field(25, description="shapley_sampling: random permutations of the input tokens")
    evals: PositiveInt = Field(500, description="shap: model evaluations (shap's max_evals); too few leave "
                               "neighbouring tokens unsplit, sharing one value")
    baseline: Literal["pad", "unk", "eos"] = Field(
        "pad", description="the token that stands for 'absent': integrated gradients start from its embedding at "
        "every prompt position; the perturbation methods put it in place of the tokens they remove")
    max_prompt_tokens: PositiveInt = Field(256, description="the longest rendered prompt explained (tokens, chat "
                                           "template included); cost grows with it")
    max_target_tokens: PositiveInt = Field(32, description="the longest target explained (tokens); also the length "
                                           "of the greedy answer generated when no target is given")
    influence: InfluenceConfig = Field(default_factory=InfluenceConfig,
                                       description="`raylab explain --influence`: which training records shaped an answer")
