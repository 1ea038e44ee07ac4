"""`raylab optimize CONFIG --model REF`: a registered version, merged onto float weights and
quantised (here), pruned and recovered (recover.py) or distilled into a student (distill.py),
registered as a new version derived from REF.

    raylab optimize configs/quickstart.yaml --model acme-assistant/3 optimize.quantize=int8_weight_only
    raylab models show acme-assistant/4        # raylab.derived_from acme-assistant/3, raylab.quantized ...
    raylab serve configs/quickstart.yaml --model acme-assistant/4

Steps: refuse what cannot work before loading anything (no method, a REF that is not a
registry version, a version that is already quantised, int4 without CUDA/XPU); load REF
through `models.load` in float32 (checksums verified); merge an adapter into its base
(`merge_and_unload`: the adapter is folded into full-precision weights, never into a
quantised base); quantise with torchao (quantize.py), count the layers changed; save as
safetensors with the quantization_config; register with the lineage and measurements.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from raylab import models, registry
from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.optimize import distill, recover, report
from raylab.optimize import quantize as q

log = logging.getLogger(__name__)

QUANTIZED_TAG = "raylab.quantized"
# A fixed probe: the logit drift recorded on the version is comparable between versions.
PROBE = "The quick brown fox jumps over the lazy dog. Quantised weights, same answers?"


def check_parent(mv, key: str = "optimize.quantize") -> None:
    """Exit 2 for a version that is already quantised (its tag, or a quantization_config in
    its files as a second line: quantising twice compounds the error, and a merge into a
    quantised base is what this stage exists to avoid; pruning needs float weights to slice
    and to fine-tune)."""
    method = mv.tags.get(QUANTIZED_TAG)
    if method:
        parent = mv.tags.get("raylab.derived_from", "its parent")
        verb = {"optimize.quantize": "quantise", "optimize.prune": "prune"}.get(key, "distil from")
        raise UserError(f"--model {mv.name}/{mv.version}: already quantised ({QUANTIZED_TAG}={method}); "
                        f"{key} applies to a float version: {verb} {parent} instead")


def check_config(cfg: RaylabConfig) -> None:
    """What can be refused before anything runs (`raylab run` calls it before its first stage,
    so a config that cannot be optimised here fails in seconds, not after training): int4
    without CUDA/XPU."""
    if cfg.optimize.quantize is not None:
        q.check_device(cfg.optimize.quantize)


def _file_bytes(local_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(local_dir) for f in files)


def _probe_logits(model, tok):
    import torch

    ids = tok(PROBE, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def run_optimize(cfg: RaylabConfig, model_ref: str, store: registry.Store | None = None) -> dict:
    """Quantise (optimize.quantize), prune and recover (optimize.prune, recover.py) or distil
    (optimize.distill, distill.py) the registered version `model_ref` and register the result;
    returns {name, version, derived_from, method, ..., measurements}: for quantisation
    quantized_layers, eligible_layers, size_bytes, parameters, logit_drift; for pruning what
    `recover.run_prune` returns; for distillation what `distill.run_distill` returns;
    measurements: the result against its parent (report.py: {parent, result, ratios, ...}),
    unless optimize.measure is null."""
    opt = cfg.optimize
    if opt.quantize is None and opt.prune is None and opt.distill is None:
        raise UserError("optimize.quantize: not set (nor optimize.prune, nor optimize.distill); choose "
                        "int8_weight_only, int8_dynamic or int4_weight_only (e.g. optimize.quantize=int8_weight_only "
                        "on the command line), prune (e.g. optimize.prune.heads=0.25 optimize.prune.mlp_channels=0.3) "
                        "or distil (e.g. optimize.distill.student=preset:tiny-llama)")
    if not models.is_registry_ref(model_ref):
        raise UserError(f"--model {model_ref!r}: expected a registry version NAME/VERSION or NAME@ALIAS (the result "
                        "is registered as a version derived from it)")
    store = store or registry.open_store(cfg)
    parent = registry.get_version(store, model_ref)
    if opt.prune is not None:
        check_parent(parent, "optimize.prune")
        result = recover.run_prune(cfg, store, parent)
    elif opt.distill is not None:
        check_parent(parent, "optimize.distill")
        result = distill.run_distill(cfg, store, parent)
    else:
        check_parent(parent)
        result = _quantize(cfg, store, parent)
    if opt.measure is None:
        log.info("optimize: optimize.measure is null: the result is not measured against its parent")
        return result
    # size, parameters, memory, speed and quality against the parent: tags, card, optimize/report.md
    return result | {"measurements": report.record(cfg, store, result)}


def _quantize(cfg: RaylabConfig, store: registry.Store, parent) -> dict:
    opt = cfg.optimize
    device = q.check_device(opt.quantize)
    parent_ref = f"{parent.name}/{parent.version}"
    inf = models.load(parent_ref, dtype="float32", store=store)
    if q.already_quantized(inf.model):
        raise UserError(f"--model {parent_ref}: its files are already quantised (a quantization_config in config.json); "
                        "optimize.quantize applies to a float version")
    model = inf.model.merge_and_unload() if inf.kind == "adapter" else inf.model
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    before = _probe_logits(model, inf.tokenizer)
    done = q.quantize(model, opt.quantize, include_embeddings=opt.include_embeddings, group_size=opt.group_size,
                      device=device)
    drift = q.logit_drift(before, _probe_logits(model, inf.tokenizer))
    log.info(f"optimize: {opt.quantize} quantised {len(done.quantized)} of {len(done.eligible)} layers of {parent_ref}"
             + (f" (skipped: {', '.join(done.skipped)})" if done.skipped else "") + f"; probe logit drift {drift:.4g}")
    q.make_saveable(model, opt.quantize, include_embeddings=opt.include_embeddings, group_size=opt.group_size)
    derivation = f"quantize:{opt.quantize}" + (":embeddings" if opt.include_embeddings else "")
    with tempfile.TemporaryDirectory(prefix="raylab-optimize-") as out:
        storage.save_pretrained(model, out)  # safetensors: the torchao quantizer flattens its tensors
        storage.save_pretrained(inf.tokenizer, out)
        meta_path = runs.model_file(inf.path, runs.TRAIN_META)
        meta = json.loads(storage.read_text(meta_path)) if storage.exists(meta_path) else {}
        meta.setdefault("base_model", inf.base)  # `models.identify` reads it: a full model, trained from this
        storage.write_text(runs.model_file(out, runs.TRAIN_META), json.dumps(
            meta | {"derived_from": parent_ref, "quantized": opt.quantize,
                    "include_embeddings": opt.include_embeddings}, indent=2) + "\n")
        size = _file_bytes(out)
        measured = {QUANTIZED_TAG: opt.quantize, "raylab.quantize.include_embeddings": str(opt.include_embeddings).lower(),
                    "raylab.quantize.layers": str(len(done.quantized)),
                    "raylab.quantize.eligible_layers": str(len(done.eligible)),
                    "raylab.quantize.logit_drift": f"{drift:.6g}", "raylab.size_bytes": str(size),
                    "raylab.float_weight_bytes": str(float_bytes), "raylab.parameters": str(parameters)}
        mv = registry.register_derived(store, parent, out, derivation=derivation, tags=measured,
                                       params={"optimize." + k: str(v) for k, v in opt.model_dump().items()},
                                       output_dir=cfg.output_dir, card_sections={"Quantisation": card_section(
                                           parent_ref, opt.quantize, opt.include_embeddings, done, drift, size,
                                           float_bytes, device)})
    log.info(f"optimize: registered {mv.name}/{mv.version} ({size / 1e6:.2f} MB on disk, {parameters} parameters, "
             f"float weights {float_bytes / 1e6:.2f} MB) from {parent_ref}")
    return {"name": mv.name, "version": int(mv.version), "derived_from": parent_ref, "method": opt.quantize,
            "quantized_layers": len(done.quantized), "eligible_layers": len(done.eligible), "size_bytes": size,
            "parameters": parameters, "logit_drift": drift}


def card_section(parent_ref: str, method: str, embeddings: bool, done, drift: float, size: int, float_bytes: int,
                 device: str) -> str:
    """The model card's Quantisation section (Markdown): what was done and what it measured."""
    speed = ("int8 on CPU is smaller, not faster, unless the served model is compiled (`torch.compile`): torchao's "
             "CPU paths are plain PyTorch" if device == "cpu" else f"quantised for {device}")
    return "\n".join([
        f"- Method: torchao `{method}` on the merged float32 weights of {parent_ref}"
        + (", embeddings and output head included" if embeddings else ", embeddings kept in float"),
        f"- Layers quantised: {len(done.quantized)} of {len(done.eligible)} eligible",
        f"- Size on disk: {size / 1e6:.2f} MB; float weights: {float_bytes / 1e6:.2f} MB "
        f"({size / float_bytes:.2f}x)" if float_bytes else f"- Size on disk: {size / 1e6:.2f} MB",
        f"- Logit drift on the probe prompt (max |change| / max |parent logit|): {drift:.4g}",
        f"- Speed: {speed}",
    ])
