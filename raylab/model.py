"""Base models and tokenizers, shared by the data, train and serve stages.

    tok = load_tokenizer(cfg.model)          # hub id, local directory or preset:NAME
    model = load_model(cfg.model)            # the same from_pretrained path for all three
    fingerprint(tok)["fingerprint"]          # recorded by the data stage, checked by train

A preset (`preset:tiny-llama`, `preset:tiny-gpt2`) is a transformers config with seeded
random weights and a byte-level tokenizer, materialised once under
`$RAYLAB_HOME/models/<preset>` and then loaded like any local model, so a saved adapter's
`base_model_name_or_path` points at a path that outlives the process that made it.

Every tokenizer carries a chat template: its own, the file named by `model.chat_template`,
or DEFAULT_CHAT_TEMPLATE (ChatML-style, assistant turns wrapped in `{% generation %}` so
the data stage can mask everything but the answers).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raylab.config import ModelConfig
from raylab.errors import UserError

PRESET_VERSION = 1  # bump when a preset's architecture or tokenizer changes

# Turn ends with the tokenizer's eos token, so generation stops where training taught it to.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|im_end|>"}
EXTRA_SPECIALS = ["<|im_start|>"]

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=1024),
}


def raylab_home() -> Path:
    return Path(os.environ.get("RAYLAB_HOME") or Path.home() / ".raylab").expanduser().resolve()


def build_byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials) with the default chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + EXTRA_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS, additional_special_tokens=EXTRA_SPECIALS)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def build_tiny_model(preset: str, tokenizer, seed: int = 0):
    """A randomly initialised causal LM from a preset's config (seeded, so reproducible)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(PRESETS[preset])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def materialize_preset(name: str) -> Path:
    """Build preset `name` under $RAYLAB_HOME/models/<name> once; return its directory.

    Built in a temporary sibling and renamed into place, so concurrent callers (several
    workers on one node) never see a half-written directory.
    """
    if name not in PRESETS:
        raise UserError(f"model.name_or_path: unknown preset {name!r}; expected one of: {', '.join('preset:' + p for p in PRESETS)}")
    target = raylab_home() / "models" / name
    marker = target / "raylab_preset.json"
    stamp = {"preset": name, "version": PRESET_VERSION, "template": _sha(DEFAULT_CHAT_TEMPLATE)}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tok = build_byte_tokenizer()
        model = build_tiny_model(name, tok)
        tok.save_pretrained(staging)
        model.save_pretrained(staging)
        (staging / "raylab_preset.json").write_text(json.dumps(stamp))
        if target.exists():  # an older preset version, or a half-built one from a crash
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """What from_pretrained gets: a preset's directory, a local directory or a hub id."""
    if name_or_path.startswith("preset:"):
        return str(materialize_preset(name_or_path.removeprefix("preset:")))
    if os.path.isabs(name_or_path) and not os.path.isdir(name_or_path):
        raise UserError(f"model.name_or_path: local directory {name_or_path} does not exist")
    return name_or_path


def _hub_error(cfg: ModelConfig, e: Exception) -> UserError:
    return UserError(
        f"model.name_or_path: could not load {cfg.name_or_path!r}: {type(e).__name__}: {e}. "
        "Give a local directory with a saved model, a reachable hub id, or preset:tiny-llama"
    )


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer with a pad token and a chat template, ready for every stage."""
    from transformers import AutoTokenizer

    source = resolve(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg, e) from None
    if cfg.chat_template:
        try:
            tok.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"model.chat_template: cannot read {cfg.chat_template}: {e.strerror}") from None
    elif not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.pad_token is None:  # padding positions are masked out of the loss
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.float32  # CPU-safe; the train stage picks bf16 autocast where supported
    return getattr(torch, name)


def load_model(cfg: ModelConfig, dtype: str | None = None, **extra: Any):
    """The causal LM through `AutoModelForCausalLM.from_pretrained`, whatever its source."""
    from transformers import AutoModelForCausalLM

    source = resolve(cfg.name_or_path)
    kwargs: dict[str, Any] = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=torch_dtype(dtype or cfg.dtype),
        **extra,
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg, e) from None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprint(tok) -> dict[str, Any]:
    """What must match between the data stage's shards and the model that trains on them."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: v for k, v in sorted(tok.special_tokens_map.items()) if isinstance(v, str)}
    special_ids = {k: tok.convert_tokens_to_ids(v) for k, v in specials.items()}
    parts = {
        "vocab_size": len(vocab),
        "vocab_hash": _sha(json.dumps(vocab, ensure_ascii=False)),
        "special_tokens": {k: [specials[k], special_ids[k]] for k in specials},
        "template_hash": _sha(tok.chat_template or ""),
    }
    parts["fingerprint"] = _sha(json.dumps(parts, sort_keys=True))
    return parts


# ---------------------------------------------------------------- training setup


def load_config(cfg: ModelConfig):
    """The model's transformers config (no weights): for checks made before any worker starts."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg, e) from None


def max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def training_problems(cfg: ModelConfig, seq_len: int, gpus_per_worker: float) -> list[str]:
    """Everything about the model that would fail inside a worker, found on the driver.

    The module names come from the model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM
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
    if cfg.method != "full":
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        names = [n for n, _ in skeleton.named_modules() if n]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        for key, wanted in (("model.lora.target_modules", cfg.lora.target_modules),
                            ("model.lora.modules_to_save", cfg.lora.modules_to_save)):
            missing = [t for t in wanted if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                problems.append(f"{key}: the model has no module named {missing}; its module names include {leaves[:30]}")
    return problems


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


def load_for_training(cfg: ModelConfig, device=None):
    """Base model (4-bit for qlora) with the method applied, on `device`."""
    kwargs = {}
    if cfg.method == "qlora":
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": device}
    model = load_model(cfg, **kwargs)
    if device is not None and cfg.method != "qlora":
        model.to(device)
    return apply_method(model, cfg)
