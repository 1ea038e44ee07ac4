"""The `optimize:` section: what `raylab optimize CONFIG --model REF` does to a registered
version. Today: weight quantisation through torchao (docs/optimize.md).

    optimize:
      quantize: int8_weight_only     # int8_dynamic | int4_weight_only (CUDA/XPU only)
      include_embeddings: true       # the input embedding and the LM head as well
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylab.config.types import PositiveInt, Section

QUANTIZE_METHODS = ("int8_weight_only", "int8_dynamic", "int4_weight_only")


class OptimizeConfig(Section):
    """`raylab optimize`: a new registry version derived from --model REF (merged, then quantised)."""

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
