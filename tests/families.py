"""Tiny random-weight models of the families companies fine-tune, built from each family's
real config class (issue 22 item 5): shared by tests/unit/models/test_families.py (packing,
module names, LoRA and merge without Ray) and tests/integration/test_family_configs.py (the
shipped configs/families/*.yaml through the pipeline)."""

from __future__ import annotations

import torch

# Each family's real config class (`model_type`) at a size that runs in a second, with what
# makes the family differ kept on (Llama 3's rope scaling, Qwen 2.5's attention biases,
# Qwen 3's and Gemma 3's query/key norms, Gemma 2's soft-capping and sliding-window layers,
# Phi-2's partial rotary and parallel block, Phi-3's fused projections).
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)

FAMILIES: dict[str, dict] = {
    "llama3": {"config": dict(model_type="llama", **_SMALL, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}), "attention": ["q_proj", "v_proj"]},
    "qwen2.5": {"config": dict(model_type="qwen2", **_SMALL), "attention": ["q_proj", "k_proj", "v_proj"]},
    "qwen3": {"config": dict(model_type="qwen3", head_dim=16, **_SMALL), "attention": ["q_proj", "v_proj", "o_proj"]},
    "mistral": {"config": dict(model_type="mistral", sliding_window=None, **_SMALL), "attention": ["q_proj", "v_proj"]},
    "gemma2": {"config": dict(model_type="gemma2", head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **_SMALL),
               "attention": ["q_proj", "v_proj"]},
    "gemma3": {"config": dict(model_type="gemma3_text", head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                              **_SMALL), "attention": ["q_proj", "v_proj"]},
    "phi2": {"config": dict(model_type="phi", partial_rotary_factor=0.5, **_SMALL), "attention": ["q_proj", "v_proj", "dense"]},
    "phi3": {"config": dict(model_type="phi3", **_SMALL), "attention": ["qkv_proj", "o_proj"]},
}

def build(family: str, tok, seed: int = 0, **changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family]["config"]) | changes
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **spec)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny(family: str, path, seed: int = 0, **changes) -> None:
    """The family's tiny model with raylab's byte-level tokenizer and default chat template
    (no hub here: each family's own tokenizer cannot be fetched), as a save_pretrained directory."""
    from raylab import models

    tok = models.build_byte_tokenizer()
    tok.chat_template = models.DEFAULT_CHAT_TEMPLATE
    build(family, tok, seed, **changes).save_pretrained(path)
    tok.save_pretrained(path)
