"""The `optimize:` section: what `raylab optimize CONFIG --model REF` does to a registered
version: weight quantisation through torchao, or structured pruning with a recovery
fine-tune (docs/optimize.md). One method per run.

    optimize:
      quantize: int8_weight_only     # int8_dynamic | int4_weight_only (CUDA/XPU only)
      include_embeddings: true       # the input embedding and the LM head as well

    optimize:
      prune: {heads: 0.25, mlp_channels: 0.3, calibration_samples: 32, recovery_steps: 50}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from raylab.config.types import PositiveInt, Section, invalid

QUANTIZE_METHODS = ("int8_weight_only", "int8_dynamic", "int4_weight_only")
# Strictly inside (0, 1): 0 removes nothing (leave the key out), 1 removes the whole block.
OpenFraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class PruneConfig(Section):
    """Structured pruning of a Llama-family model (whole heads, whole MLP channels), then a
    short full fine-tune on the data stage's shards to recover."""

    heads: OpenFraction | None = Field(
        None, description="share of attention heads to remove in every layer, in (0, 1); with grouped-query "
        "attention whole key/value groups go (with their query heads), so it is rounded to whole groups")
    mlp_channels: OpenFraction | None = Field(
        None, description="share of MLP channels (intermediate_size) to remove in every layer, in (0, 1)")
    calibration_samples: PositiveInt = Field(
        32, description="packed sequences of the train split run through the model to score heads and channels")
    recovery_steps: PositiveInt = Field(
        50, description="optimizer steps of the recovery fine-tune (a full fine-tune on Ray Train, the train section's "
        "other settings)")

    @model_validator(mode="after")
    def _something(self) -> PruneConfig:
        if self.heads is None and self.mlp_channels is None:
            raise invalid("removes nothing: set heads and/or mlp_channels (fractions in (0, 1))", at="heads")
        return self


class OptimizeConfig(Section):
    """`raylab optimize`: a new registry version derived from --model REF (merged, then quantised or pruned)."""

    quantize: Literal["int8_weight_only", "int8_dynamic", "int4_weight_only"] | None = Field(
        None, description="torchao weight quantisation of the merged model: int8_weight_only (int8 weights, "
        "float activations), int8_dynamic (int8 weights and per-token int8 activations) or int4_weight_only "
        "(grouped int4 weights; packs only for CUDA/XPU, refused on CPU)")
    include_embeddings: bool = Field(
        False, description="quantise the input embedding and the LM head too (a tied LM head is untied first); "
        "they are most of a small model's bytes")
    group_size: PositiveInt = Field(
        128, description="int4_weight_only: weights per scale; a Linear whose input width is not a multiple "
        "of it stays unquantised (counted, and a result with none quantised is refused)")
    prune: PruneConfig | None = Field(
        None, description="structured pruning of the merged model (whole heads and MLP channels, ranked by "
        "Wanda-style |weight| x activation norm on a train-split sample), then a recovery fine-tune")

    @model_validator(mode="after")
    def _one_method(self) -> OptimizeConfig:
        if self.quantize is not None and self.prune is not None:
            raise invalid("set together with optimize.quantize; one method per run (prune first, then quantise "
                          "the pruned version)", at="prune")
        return self
