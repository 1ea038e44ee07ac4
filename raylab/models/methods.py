"""Fine-tuning methods on a loaded base model: LoRA, DoRA, QLoRA, hybrid (peft) and full,
and the checks that would otherwise fail inside a Ray Train worker.

    problems = training_problems(cfg.model, seq_len=512, gpus_per_worker=0)   # on the driver
    model = load_for_training(cfg.model, device)                              # in each worker
"""

from __future__ import annotations

from raylab.config import ModelConfig
from raylab.models.loading import load_config, load_model, max_positions, resolved_dtype, skeleton


def training_problems(cfg: ModelConfig, seq_len: int, gpus_per_worker: float) -> list[str]:
    """Everything about the model that would fail inside a worker, found on the driver.

    The module names come from the model built on the meta device (no memory, no weights)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = load_config(cfg)
    remote_causal = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote_causal:
        arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        return [f"model.name_or_path: {cfg.name_or_path} is a {arch} ({config.model_type}), not a causal language "
                "model; raylab fine-tunes decoder LMs (Llama, Qwen, Mistral, GPT-2, ...)"]
    problems = []
    positions = max_positions(config)
    if positions is not None and seq_len > positions:
        problems.append(f"data.max_seq_len={seq_len} is beyond the model's {positions} positions; "
                        f"lower data.max_seq_len to at most {positions} and rerun `raylab data`")
    if cfg.method == "qlora":
        import importlib.util

        if gpus_per_worker <= 0:
            problems.append("model.method=qlora quantises the base model to 4 bits with bitsandbytes, which needs a GPU; "
                            "set train.gpus_per_worker (on a GPU cluster) or use method: lora")
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append("model.method=qlora needs the bitsandbytes package: pip install bitsandbytes")
    problems += _attention_problems(cfg, config, gpus_per_worker)
    if cfg.method != "full":
        names = [n for n, _ in skeleton(cfg, config).named_modules() if n]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        for key, wanted in (("model.lora.target_modules", cfg.lora.target_modules),
                            ("model.lora.modules_to_save", cfg.lora.modules_to_save)):
            missing = [t for t in wanted if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                problems.append(f"{key}: the model has no module named {missing}; its module names include {leaves[:30]}")
    return problems


def _attention_problems(cfg: ModelConfig, config, gpus_per_worker: float) -> list[str]:
    import importlib.util

    impl = cfg.attn_implementation
    if impl == "sdpa" and getattr(config, "attn_logit_softcapping", None):
        # transformers raises "`sdpa` attention does not support `softcap`" in the first forward
        return [f"model.attn_implementation=sdpa: this {config.model_type} model soft-caps its attention logits, "
                "which SDPA cannot do; use eager (its default), flash_attention_2 or flex_attention"]
    if impl == "flash_attention_2":
        if gpus_per_worker <= 0:
            return ["model.attn_implementation=flash_attention_2 runs only on CUDA GPUs; set train.gpus_per_worker "
                    "(on a GPU cluster) or use sdpa"]
        if importlib.util.find_spec("flash_attn") is None:
            return ["model.attn_implementation=flash_attention_2 needs the flash-attn package: pip install flash-attn"]
    if impl == "flex_attention" and gpus_per_worker <= 0:
        # torch 2.13 raises "FlexAttention does not support backward on CPU" at the first step.
        return ["model.attn_implementation=flex_attention has no backward pass on CPU in torch; set "
                "train.gpus_per_worker (on a GPU cluster) or use sdpa"]
    return []


def apply_method(model, cfg: ModelConfig):
    """LoRA / DoRA / QLoRA / hybrid through peft; full fine-tuning trains every weight.

    Hybrid is LoRA on `lora.target_modules` plus full training of `lora.modules_to_save`
    (peft keeps a trainable copy of those modules and saves it with the adapter)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = cfg.lora.target_modules
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        modules_to_save=list(cfg.lora.modules_to_save) or None,
        use_dora=cfg.method == "dora",
        # A tied embedding trained in full (hybrid) stays tied to the output head.
        ensure_weight_tying=bool(cfg.lora.modules_to_save),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def load_for_training(cfg: ModelConfig, device=None, dtype: str | None = None):
    """Base model (4-bit for qlora) with the method applied, on `device`; its weights in
    `dtype`, else the one `resolved_dtype` picks for the device. With `model.dtype: auto` a
    half-precision base keeps what is trained in float32 (mixed precision: the optimizer
    updates full-precision weights; autocast computes in bf16)."""
    import torch

    dtype = dtype or resolved_dtype(cfg, device)[0]
    kwargs = {}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": device}
    model = load_model(cfg, dtype=dtype, **kwargs)
    if device is not None and cfg.method != "qlora":
        model.to(device)
    model = apply_method(model, cfg)
    if cfg.dtype == "auto" and dtype != "float32":
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (non-reentrant, which also makes the
    input embeddings require grads). transformers has spelled the switch two ways across 5.x
    (`activation_checkpointing_enable` in some releases, `gradient_checkpointing_enable` in
    others, 5.19 among them): take whichever the installed one has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
