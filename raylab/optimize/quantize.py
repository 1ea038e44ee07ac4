"""Weight quantisation of a merged model with torchao, and a format that reloads as it is.

    device = check_device("int8_weight_only")                     # "cpu"; int4 wants CUDA/XPU
    done = quantize(model, "int8_weight_only", include_embeddings=True)
    done.quantized, done.eligible                                 # module names
    make_saveable(model, "int8_weight_only", include_embeddings=True)
    model.save_pretrained(out)                                    # safetensors + quantization_config
    AutoModelForCausalLM.from_pretrained(out)                     # no re-quantisation

Why not `from_pretrained(..., quantization_config=TorchAoConfig(...))` (transformers quantising
at load): with transformers 5.24 it leaves the embeddings in float even with
`include_input_output_embeddings`, and a tied LM head comes back missing from the saved
file. So raylab calls torchao's `quantize_` itself on the merged model, with a filter that
names exactly the modules it means, and hands transformers' own torchao quantizer to the
model only for saving: its `get_state_dict_and_metadata` flattens torchao's tensor
subclasses into safetensors, and the `quantization_config` in config.json makes
`from_pretrained` rebuild them (pre-quantised: nothing is quantised again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raylab.errors import UserError

KEY = "optimize.quantize"


def _import_torchao() -> None:
    """Import torchao without its import-time warnings: the CUDA kernel libraries a CPU build
    of torch cannot load, and torch's notice about enums torchao registers for torch.compile
    (a line each, on every run, about nothing the user can change)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "torchao":
            raise
        raise UserError(f"{KEY} needs torchao, which is not installed: pip install 'raylab[optimize]'") from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _config(method: str, group_size: int):
    """torchao's config object for a method name (the names of `optimize.quantize`)."""
    _import_torchao()
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if method == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if method == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "int4_weight_only":
        return Int4WeightOnlyConfig(group_size=group_size)
    raise UserError(f"{KEY}: {method!r} is not a quantisation method; expected int8_weight_only, int8_dynamic "
                    "or int4_weight_only")


def check_device(method: str) -> str:
    """The device to quantise on. torchao's stable int4 layout packs only for CUDA/XPU (its
    CPU int4 is a prototype that cannot be saved as safetensors), so int4 without one is a
    user error; int8 runs on the CPU (plain PyTorch kernels there)."""
    import torch

    if method != "int4_weight_only":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    raise UserError(f"{KEY}: int4_weight_only needs a CUDA or XPU device (torchao's int4 packs only for them) and "
                    "this machine has neither; use int8_weight_only or int8_dynamic on CPU")


def is_quantized(weight) -> bool:
    """Whether a module's weight is a torchao tensor subclass (what `quantize_` leaves on a
    module it changed; a module it skipped keeps a plain Parameter)."""
    _import_torchao()
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def already_quantized(model) -> bool:
    """A model loaded from a quantised directory: its config names a quantisation, or any
    weight is a torchao subclass."""
    if getattr(model.config, "quantization_config", None) is not None:
        return True
    return any(is_quantized(getattr(m, "weight", None)) for m in model.modules())


@dataclass
class Quantized:
    method: str
    eligible: list[str] = field(default_factory=list)   # modules asked for
    quantized: list[str] = field(default_factory=list)  # modules whose weight is now a torchao tensor

    @property
    def skipped(self) -> list[str]:
        return [n for n in self.eligible if n not in set(self.quantized)]


def eligible_modules(model, include_embeddings: bool) -> list[str]:
    """Every Linear, less the LM head unless embeddings are included (a tied head shares the
    input embedding's weight, which stays float then); with embeddings, the input embedding too."""
    import torch

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (include_embeddings or module is not head):
            names.append(name)
        elif include_embeddings and module is emb:
            names.append(name)
    return names


def untie(model) -> None:
    """Give a tied LM head its own copy of the embedding weight, so each is quantised (and
    saved) on its own; the config says untied, so loading does not tie them back."""
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.tie_word_embeddings = False


def quantize(model, method: str, *, include_embeddings: bool = False, group_size: int = 128,
             device: str = "cpu") -> Quantized:
    """Quantise `model` in place (float weights, an adapter already merged) with torchao's
    `quantize_`, and count what it changed: int4 silently skips a Linear whose input width
    is not a multiple of `group_size`, so a result where nothing changed is refused."""
    import torch
    from torchao.quantization import quantize_

    if already_quantized(model):
        raise UserError(f"{KEY}: the model is already quantised; quantise the float version it was derived from")
    if include_embeddings:
        untie(model)
    if method == "int4_weight_only":  # torchao's int4 kernels take bfloat16 weights on the accelerator
        model.to(device=device, dtype=torch.bfloat16)
    names = eligible_modules(model, include_embeddings)
    wanted = set(names)
    quantize_(model, _config(method, group_size), filter_fn=lambda _module, fqn: fqn in wanted)
    modules = dict(model.named_modules())
    done = Quantized(method, names, [n for n in names if is_quantized(modules[n].weight)])
    if not done.quantized:
        raise UserError(f"{KEY}: {method} quantised none of the model's {len(names)} eligible layers"
                        + (f" (each input width must be a multiple of optimize.group_size={group_size})"
                           if method == "int4_weight_only" else ""))
    return done


def make_saveable(model, method: str, *, include_embeddings: bool = False, group_size: int = 128) -> None:
    """Let `save_pretrained` write the quantised model: the quantization_config that tells
    `from_pretrained` what the tensors are, and transformers' torchao quantizer, whose
    state dict flattens torchao's subclasses for safetensors."""
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    qc = TorchAoConfig(_config(method, group_size), include_input_output_embeddings=include_embeddings)
    model.config.quantization_config = qc
    model.hf_quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=True)


def logit_drift(reference, other) -> float:
    """max |logits - reference| / max |reference|: how far a quantised model's logits moved,
    relative to the parent's scale (one number per probe; raylab records it on the version)."""
    ref, out = reference.float(), other.float().to(reference.device)
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
