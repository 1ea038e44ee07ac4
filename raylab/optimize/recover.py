"""`raylab optimize CONFIG --model REF optimize.prune.heads=...`: a registered version, merged
onto float weights, structurally pruned (prune.py), fine-tuned briefly on Ray Train to
recover, and registered as a new version derived from REF.

    raylab data configs/quickstart.yaml          # the shards the recovery trains on (already there after `raylab run`)
    raylab optimize configs/quickstart.yaml --model acme-assistant/3 \
        optimize.prune.heads=0.25 optimize.prune.mlp_channels=0.3 optimize.prune.recovery_steps=50
    raylab models show acme-assistant/4          # raylab.derived_from acme-assistant/3, raylab.pruned ...

Steps: refuse what cannot work before training (a model family prune.py cannot slice,
fractions that round to nothing or everything, no data stage output, shards tokenized with
another tokenizer than REF's); load REF in float32 and merge an adapter into its base; score heads
and MLP channels on `calibration_samples` packed rows of the train split; prune; save the
pruned model as the base of a nested run `<output_dir>/optimize/<name>/` with a copy of the
data manifest (the shards are read where they are, as the pretrain stage does); run the
train stage on it (`raylab.train.run_train`: method full, `recovery_steps` steps, the train
section's other settings, not tracked: the result is registered here, once); register its
final/ with the lineage, parameter counts and the recovery's losses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

from raylab import config, models, registry
from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.optimize import prune as p

log = logging.getLogger(__name__)

PRUNED_TAG = "raylab.pruned"
SCORE = "Wanda (|weight| x input activation L2 norm, summed over each head's o_proj columns and each channel's " \
        "down_proj column)"


def calibration_batches(location: str, samples: int) -> list:
    """`samples` packed rows of the train split, evenly spaced over it (the split is written in a
    fixed order, so the same rows every time), each cut to its real tokens (no padding)."""
    import torch

    table = storage.read_table(location, ["input_ids", "num_tokens"])
    n = table.num_rows
    if n == 0:
        raise UserError(f"optimize.prune.calibration_samples: the train split at {location} is empty")
    picks = sorted({int(i * n / min(samples, n)) for i in range(min(samples, n))})
    ids, lengths = table.column("input_ids"), table.column("num_tokens")
    return [torch.tensor([ids[i].as_py()[:lengths[i].as_py()]]) for i in picks if lengths[i].as_py() > 0]


def nested_run(cfg: RaylabConfig, run: runs.Run, manifest, method: str, parent, settings: dict,
               copy_manifest: bool = True) -> runs.Run:
    """The run directory a derived model trains in (pruning's recovery, distillation), holding
    the parent run's data manifest (the shards stay where they are; `copy_manifest=False`: a
    run with a data stage of its own). It is named by what that training depends on, so another
    lr or batch size is another run, not a resume refused for changed settings."""
    material = {method: settings, "train": cfg.train.model_dump(mode="json"), "data": runs.manifest_hash(manifest)}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:8]
    nested = run.optimize(f"{method}-{parent.name}-{parent.version}-{digest}")
    if copy_manifest:
        storage.write_text(nested.manifest, storage.read_text(run.manifest))
    return nested


def nested_train_raw(cfg: RaylabConfig, nested: runs.Run, steps: int, lr: float | None = None,
                     optimize: dict | None = None) -> dict:
    """The raw config of a derived model's training in `nested` (pruning's recovery, distillation):
    nested.base in full (with its own tokenizer and chat template), `steps` steps evaluated twice
    with no periodic checkpoints or early stopping, lr when given, untracked (the caller registers
    the result as a derived version, not as a train run)."""
    raw = cfg.model_dump(mode="json")
    raw.update(output_dir=nested.root, tune=None, pretrain=None, optimize=optimize or {})
    raw["model"] = {k: raw["model"][k] for k in ("dtype", "attn_implementation")} | {
        "name_or_path": nested.base, "method": "full"}
    raw["train"].update(max_steps=steps, eval_every=max(1, steps // 2), checkpoint_every=None,
                        early_stopping_patience=None, log_every=max(1, steps // 10))
    if lr is not None:
        raw["train"]["lr"] = lr
    raw["registry"].update(enabled=False)
    return raw


def recovery_config(cfg: RaylabConfig, nested: runs.Run) -> RaylabConfig:
    """The train-stage config of the recovery fine-tune: the pruned model (REF's tokenizer and
    chat template, checked against the shards) in full, on the data stage's shards, for
    optimize.prune.recovery_steps steps, untracked."""
    raw = nested_train_raw(cfg, nested, cfg.optimize.prune.recovery_steps)
    raw["train"]["keep_checkpoints"] = 1
    return config.load_dict(raw)


def run_prune(cfg: RaylabConfig, store: registry.Store, parent) -> dict:
    """Prune the registered version `parent` (a ModelVersion) as `cfg.optimize.prune` says,
    recover it on Ray Train and register the result; returns {name, version, derived_from,
    method, heads_removed, channels_removed, parameters_before, parameters, recovery_steps,
    recovery_train_loss, recovery_val_loss, pruned_val_loss}."""
    from raylab.train import run_train

    opt = cfg.optimize.prune
    parent_ref = f"{parent.name}/{parent.version}"
    if "://" in cfg.output_dir:  # every recovery worker loads the pruned model with from_pretrained, from a path
        raise UserError(f"output_dir {cfg.output_dir}: optimize.prune's recovery fine-tune starts from the pruned "
                        "model saved under <output_dir>/optimize/, which workers load from a path; use a local path "
                        "or a shared mount")
    inf = models.load(parent_ref, dtype="float32", store=store)
    if getattr(inf.model.config, "quantization_config", None) is not None:
        raise UserError(f"--model {parent_ref}: its files are quantised (a quantization_config in config.json); "
                        "optimize.prune needs float weights: prune the version it was derived from")
    plan = p.plan_for(inf.model.config, opt.heads, opt.mlp_channels)  # the family and the counts, before any work
    run = runs.Run(cfg.output_dir)
    manifest = runs.read_manifest(run, cfg.source)
    if models.fingerprint(inf.tokenizer)["fingerprint"] != manifest.tokenizer.get("fingerprint"):
        raise UserError(f"--model {parent_ref}: the data shards in {run.data} were tokenized with another tokenizer; "
                        "the recovery fine-tune trains on them: run `raylab data` with this model's tokenizer "
                        "(or point output_dir at the run that trained it)")
    model = inf.model.merge_and_unload() if inf.kind == "adapter" else inf.model
    batches = calibration_batches(manifest.outputs["train"], opt.calibration_samples)
    done = p.prune(model, plan, p.importance(model, batches))
    log.info(f"optimize: pruned {plan.heads_removed} of {plan.heads} heads ({plan.groups_removed} of {plan.kv_heads} "
             f"key/value groups) and {plan.channels_removed} of {plan.channels} MLP channels per layer of {parent_ref}: "
             f"{done.parameters_before:,} -> {done.parameters_after:,} parameters; recovering for "
             f"{opt.recovery_steps} steps")
    settings = opt.model_dump(mode="json")
    nested = nested_run(cfg, run, manifest, "prune", parent, settings)
    storage.save_pretrained(model, nested.base)
    storage.save_pretrained(inf.tokenizer, nested.base)
    meta = run_train(recovery_config(cfg, nested), track=False)
    losses = meta["metrics"]
    derivation = "prune:" + ":".join(f"{k}={settings[k]}" for k in ("heads", "mlp_channels") if settings[k])
    with tempfile.TemporaryDirectory(prefix="raylab-optimize-") as out:
        storage.copy_dir(nested.train_final, out)
        parent_meta = runs.model_file(inf.path, runs.TRAIN_META)
        base = (json.loads(storage.read_text(parent_meta)) if storage.exists(parent_meta) else {}).get("base_model")
        storage.write_text(runs.model_file(out, runs.TRAIN_META), json.dumps(meta | {
            "base_model": base or inf.base, "recovered_from": meta["base_model"], "derived_from": parent_ref,
            "pruned": {"heads_removed": plan.heads_removed, "kv_groups_removed": plan.groups_removed,
                       "mlp_channels_removed": plan.channels_removed, "score": "wanda",
                       "parameters_before": done.parameters_before, "parameters": done.parameters_after}},
            indent=2) + "\n")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
        tags = {PRUNED_TAG: derivation.removeprefix("prune:"), "raylab.prune.heads_removed": str(plan.heads_removed),
                "raylab.prune.kv_groups_removed": str(plan.groups_removed),
                "raylab.prune.mlp_channels_removed": str(plan.channels_removed), "raylab.prune.score": "wanda",
                "raylab.prune.recovery_steps": str(meta["steps"]),
                "raylab.prune.recovery_val_loss": f"{losses['val_loss']:.6g}",
                "raylab.parameters_before": str(done.parameters_before),
                "raylab.parameters": str(done.parameters_after), "raylab.size_bytes": str(size)}
        mv = registry.register_derived(store, parent, out, derivation=derivation, tags=tags,
                                       params={"optimize.prune." + k: str(v) for k, v in settings.items()}
                                       | {"optimize.prune.recovery_identity": meta["identity"]},
                                       output_dir=cfg.output_dir,
                                       card_sections={"Pruning": card_section(parent_ref, plan, done, meta)})
    log.info(f"optimize: registered {mv.name}/{mv.version} ({done.parameters_after:,} parameters, "
             f"{size / 1e6:.2f} MB on disk) from {parent_ref}; recovery val_loss {losses['initial_val_loss']:.4f} -> "
             f"{losses['val_loss']:.4f}")
    return {"name": mv.name, "version": int(mv.version), "derived_from": parent_ref, "method": "prune",
            "heads_removed": plan.heads_removed, "kv_groups_removed": plan.groups_removed,
            "channels_removed": plan.channels_removed, "parameters_before": done.parameters_before,
            "parameters": done.parameters_after, "size_bytes": size, "recovery_steps": meta["steps"],
            "recovery_train_loss": losses["train_loss"], "recovery_val_loss": losses["val_loss"],
            "pruned_val_loss": losses["initial_val_loss"]}


def card_section(parent_ref: str, plan: p.Plan, done: p.Pruned, meta: dict) -> str:
    """The model card's Pruning section (Markdown): what was removed, how it was chosen, what
    the recovery fine-tune did."""
    m = meta["metrics"]
    gqa = f" ({plan.groups_removed} of {plan.kv_heads} key/value groups)" if plan.kv_heads < plan.heads else ""
    return "\n".join([
        f"- Method: structured pruning of the merged float32 weights of {parent_ref}, the same count in every layer",
        f"- Attention heads removed per layer: {plan.heads_removed} of {plan.heads}{gqa}; head_dim {plan.head_dim} kept",
        f"- MLP channels removed per layer: {plan.channels_removed} of {plan.channels}",
        f"- Parameters: {done.parameters_before:,} before, {done.parameters_after:,} after "
        f"({done.parameters_after / done.parameters_before:.3f}x)",
        f"- Importance score: {SCORE}, on a calibration sample of the train split",
        f"- Recovery: a full fine-tune on Ray Train on the same data shards, {meta['steps']} steps; final train loss "
        f"{m['train_loss']:.4f}, val loss {m['initial_val_loss']:.4f} before recovery -> {m['val_loss']:.4f} after",
    ])
