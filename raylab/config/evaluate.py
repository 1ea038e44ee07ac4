"""The `eval:` section: batch evaluation and inference."""

from __future__ import annotations

from pydantic import Field

from raylab.config.bias import BiasProbesConfig
from raylab.config.types import PathOrUri, PositiveInt, Section


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
