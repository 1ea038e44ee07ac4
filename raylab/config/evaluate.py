"""The `eval:` section: batch evaluation and inference."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylab.config.bias import BiasProbesConfig
from raylab.config.types import PathOrUri, PositiveInt, Section


class GlobalExplanationConfig(Section):
    """`raylab eval`'s global explanation (raylab/explain/aggregate.py): token attributions of the
    tuned model's answers over a sample of the held-out split, aggregated by prompt part
    (system, context, question, chat template) and by position, written as JSON and a plot."""

    samples: PositiveInt = Field(16, description="records explained: the first of those `raylab eval` answers (the "
                                 "held-out split by record id, up to eval.max_samples, or --input)")
    method: Literal["integrated_gradients", "feature_ablation", "shapley_sampling"] = Field(
        "feature_ablation", description="the attribution method (raylab explain's): feature_ablation costs one forward "
        "pass per prompt token, integrated_gradients n_steps forward and backward passes per answer token")
    n_steps: PositiveInt = Field(16, description="integrated_gradients: steps from the baseline (the report keeps "
                                 "each answer's convergence delta)")
    max_target_tokens: PositiveInt = Field(16, description="answer tokens explained per record (the greedy answer is "
                                           "cut here)")
    target: Literal["greedy", "reference"] = Field(
        "greedy", description="greedy: explain the model's own answer; reference: the record's reference answer, "
        "teacher-forced")


class EvalConfig(Section):
    """`raylab eval` and the gates: batch inference in a Ray Data actor pool."""

    max_samples: PositiveInt = Field(64, description="held-out records answered for exact match / ROUGE-L")
    max_new_tokens: PositiveInt = Field(64, description="answer length budget")
    batch_size: PositiveInt = Field(8, description="prompts per batch")
    actors: PositiveInt = Field(1, description="model copies in the actor pool")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPUs per actor (also its torch threads)")
    show_samples: int = Field(5, ge=0, description="side-by-side answers in the report")
    held_out: PathOrUri | None = Field(
        None, description="questions kept out of the training data (JSONL, `raylab eval --input`'s format, with a "
                          "reference each) that `raylab run` asks base and tuned model after serving, scored with "
                          "ROUGE-L; default: a few records of the data stage's val split")
    bias_probes: BiasProbesConfig | None = Field(
        None, description="counterfactual bias probes `raylab eval` runs on base and tuned model (and the "
                          "registry.gates.max_bias_gap gate): the shipped gender/age/nationality sets and/or your own; "
                          "`bias_probes: {}` runs the defaults")
    global_explanation: GlobalExplanationConfig | None = Field(
        None, description="attributions of the tuned model's answers over a sample of the held-out split, aggregated "
                          "by prompt part and position (eval/global_explanation.json and .png; a registry version's "
                          "model card links them); needs the explain extra; `global_explanation: {}` runs the defaults. "
                          "Off by default: it needs captum and runs one attribution per sampled record")
