"""The `model:` section: the base model and the fine-tuning method."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylab.config.types import (
    Fraction,
    ModelRef,
    PathOrUri,
    PositiveInt,
    Section,
    StrList,
    invalid,
)


class LoraConfig(Section):
    """LoRA / DoRA adapter settings (peft)."""

    r: PositiveInt = Field(8, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator (the update is scaled by alpha / r)")
    dropout: Fraction = Field(0.05, description="dropout on the adapter's input")
    target_modules: StrList = Field(default_factory=lambda: ["all-linear"],
                                    description="module names to adapt, or all-linear")
    modules_to_save: StrList = Field(default_factory=list, description="method hybrid: modules trained in full")


class ModelConfig(Section):
    """The model to fine-tune and how."""

    name_or_path: ModelRef = Field(description="a hub id, a local directory or preset:NAME")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights dtype when loaded")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="attention kernel; default: the model's own. flash_attention_2 needs a GPU and flash-attn; "
                          "flex_attention trains only on GPUs (torch has no backward for it on CPU)")
    trust_remote_code: bool = Field(False, description="allow the model's own Python code from the hub")
    chat_template: PathOrUri | None = Field(None, description="a Jinja file replacing the tokenizer's template")
    method: Literal["lora", "dora", "full", "hybrid", "qlora"] = Field(
        "lora", description="lora | dora | full | hybrid (LoRA + lora.modules_to_save trained in full) | qlora (GPU + bitsandbytes)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapter settings (every method but full)")

    @model_validator(mode="after")
    def _modules_to_save(self) -> ModelConfig:
        if self.method == "hybrid" and not self.lora.modules_to_save:
            raise invalid("empty, but method: hybrid trains these modules in full; name at least one "
                          "(e.g. [embed_tokens])", at="lora.modules_to_save")
        if self.method != "hybrid" and self.lora.modules_to_save:
            raise invalid(f"only used by method: hybrid (method is {self.method})", at="lora.modules_to_save")
        return self
