"""The `optimize:` section: what `raylab optimize CONFIG --model REF` does to a registered
version: weight quantisation through torchao, structured pruning with a recovery
fine-tune, or knowledge distillation into a smaller student (docs/optimize.md). One method per run.

    optimize:
      quantize: int8_weight_only     # int8_dynamic | int4_weight_only (CUDA/XPU only)
      include_embeddings: true       # the input embedding and the LM head as well

    optimize:
      prune: {heads: 0.25, mlp_channels: 0.3, calibration_samples: 32, recovery_steps: 50}

    optimize:
      distill: {student: {num_hidden_layers: 2}, temperature: 2.0, alpha: 0.5, steps: 100}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from raylab.config.types import Fraction, ModelRef, PositiveInt, Section, invalid

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


# A transformers config key of the teacher and the value the student takes instead.
ConfigValue = int | float | bool | str


class DistillConfig(Section):
    """Knowledge distillation: a smaller student trained on Ray Train against the teacher's
    (--model REF's) logits, L = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE,
    on the data stage's shards (logit distillation: the teacher's tokenizer), or on the
    teacher's greedy outputs to the train split's prompts with cross-entropy (sequence-level
    distillation, Kim & Rush 2016: any tokenizer)."""

    student: ModelRef | dict[str, ConfigValue] = Field(
        description="the student: preset:NAME (built with random weights around the teacher's tokenizer), a "
        "mapping of the teacher's transformers config keys to smaller values (e.g. {num_hidden_layers: 2}: the "
        "teacher's architecture, random weights), or a local directory / hub id of a pretrained model (with "
        "another tokenizer than the teacher's: level sequence)")
    level: Literal["auto", "logits", "sequence"] = Field(
        "auto", description="logits: the objective above on the data stage's shards (the student needs the "
        "teacher's tokenizer); sequence: the teacher answers the train split's prompts (greedy) and the student "
        "learns those answers with cross-entropy, through its own data stage (any tokenizer; temperature and alpha "
        "unused); auto: logits when the tokenizers match, else sequence")
    max_new_tokens: PositiveInt = Field(128, description="level sequence: tokens the teacher generates per prompt")
    prompt_words: PositiveInt = Field(
        8, description="level sequence: a completion record's first words are the prompt the teacher continues (a "
        "chat or instruction record's prompt is its conversation up to its last assistant turn)")
    max_prompts: PositiveInt | None = Field(
        None, description="level sequence: at most this many train-split records are prompted (by record id); "
        "default all")
    temperature: float = Field(2.0, gt=0, description="T: both distributions are softened by it before the KL")
    alpha: Fraction = Field(0.5, description="weight of the distillation term (T^2-scaled KL) against the "
                            "cross-entropy on the label tokens, in [0, 1]; 0 is plain cross-entropy")
    steps: PositiveInt = Field(100, description="optimizer steps of the student's training (a full fine-tune on "
                               "Ray Train, the train section's other settings)")
    lr: float | None = Field(None, gt=0, description="the student's peak learning rate; default train.lr (a "
                             "student with random weights usually wants a higher one)")
    eval_samples: PositiveInt = Field(
        32, description="packed rows of the val split on which teacher and student are compared after training "
        "(cross-entropy of each, KL of the student to the teacher before and after)")

    @model_validator(mode="after")
    def _student(self) -> DistillConfig:
        if isinstance(self.student, dict) and not self.student:
            raise invalid("an empty mapping changes nothing: name the teacher's config keys to shrink (e.g. "
                          "{num_hidden_layers: 2}), or give preset:NAME or a model path", at="student")
        return self


class MeasureConfig(Section):
    """The short local generation run that records a result's and its parent's tokens/s
    (raylab/optimize/measure.py): the same prompts at concurrency 1 and 16, greedy, each
    request generating exactly max_new_tokens tokens (so both models do the same work)."""

    requests: PositiveInt = Field(16, description="requests timed at each concurrency (at concurrency 16 in "
                                  "batches of 16, rounded up to whole batches), after one warm-up batch")
    max_new_tokens: PositiveInt = Field(16, description="tokens generated per request (end-of-turn ignored)")
    memory: bool = Field(True, description="peak memory at load, measured by loading each model in a fresh Python "
                         "process (seconds of interpreter start-up each); false leaves it out")


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
    distill: DistillConfig | None = Field(
        None, description="knowledge distillation of the merged model into a smaller student on Ray Train "
        "(the train.objective `distill`)")

    measure: MeasureConfig | None = Field(
        default_factory=MeasureConfig, description="the result's and its parent's measurements recorded on the new "
        "version and in <output_dir>/optimize/report.md: size on disk, parameters, peak memory at load, tokens/s, "
        "eval loss and ROUGE-L; null: not measured (registry.gates.min_speedup then fails for want of a figure)")

    @model_validator(mode="after")
    def _one_method(self) -> OptimizeConfig:
        if self.quantize is not None and self.prune is not None:
            raise invalid("set together with optimize.quantize; one method per run (prune first, then quantise "
                          "the pruned version)", at="prune")
        if self.distill is not None and (self.quantize is not None or self.prune is not None):
            raise invalid("set together with optimize." + ("quantize" if self.quantize is not None else "prune")
                          + "; one method per run (distil first, then quantise or prune the student's version)",
                          at="distill")
        return self
