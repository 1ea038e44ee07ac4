"""`raylab optimize CONFIG --model REF optimize.distill.student=...`: knowledge distillation of a
registered version (the teacher, merged) into a smaller student trained on Ray Train with the
train objective `distill` (raylab/train/distill.py), registered as a version derived from REF.

    raylab data configs/quickstart.yaml          # the shards the student trains on (already there after `raylab run`)
    raylab optimize configs/quickstart.yaml --model acme-assistant/3 \
        'optimize.distill.student={num_hidden_layers: 2}' optimize.distill.steps=200 optimize.distill.lr=3e-3
    raylab models show acme-assistant/4          # raylab.derived_from acme-assistant/3, raylab.distilled ...

Steps: refuse what cannot work before training (a URI output_dir, a quantised REF, no data
stage output or shards tokenized with another tokenizer than REF's, a student whose tokenizer
differs from the teacher's: logit distillation compares distributions over one vocabulary;
sequence-level distillation for differing tokenizers is not built); load REF in float32 and
merge an adapter into its base; build the student (`build_student`); save teacher and student
as teacher/ and base/ of a nested run `<output_dir>/optimize/distill-<name>-<version>-<hash>/`
with a copy of the data manifest; run the train stage on it (`raylab.train.run_train`: method
full, train.objective=distill, optimize.distill.steps steps, untracked; multi-worker and
resumable like any train run); compare teacher and student on the val split; register the
student's final/ with the lineage, parameter counts, losses and a card section.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile

from raylab import config, models, registry
from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.optimize.recover import nested_run

log = logging.getLogger(__name__)

DISTILLED_TAG = "raylab.distilled"
KEY = "optimize.distill.student"
# the tokenizer parts logit distillation needs equal (the chat template may differ: the shards
# were rendered with the teacher's, and the student is saved with the teacher's tokenizer)
TOKENIZER_PARTS = ("vocab_size", "vocab_hash", "special_tokens")
# Attention shape keys: a student config changing one of them gets head_dim recomputed when the
# teacher's was the default hidden_size / heads (Llama-family configs store head_dim explicitly).
SHAPE_KEYS = ("hidden_size", "num_attention_heads")


def tokenizer_mismatch(teacher_tok, student_tok) -> list[str]:
    """The fingerprint parts (vocabulary, its hash, the special tokens and their ids) that differ."""
    a, b = models.fingerprint(teacher_tok), models.fingerprint(student_tok)
    return [k for k in TOKENIZER_PARTS if a.get(k) != b.get(k)]


def check_tokenizer(teacher_tok, student_tok, student: str) -> None:
    """Exit 2 naming optimize.distill.student when the student's tokenizer is not the teacher's."""
    differ = tokenizer_mismatch(teacher_tok, student_tok)
    if differ:
        raise UserError(f"{KEY}={student}: its tokenizer differs from the teacher's ({', '.join(differ)} differ: "
                        f"vocab_size {len(student_tok.get_vocab())} vs {len(teacher_tok.get_vocab())}); logit "
                        "distillation needs the teacher's tokenizer (sequence-level distillation, which would "
                        "not, is not built): choose a student of the same family and tokenizer, preset:NAME, or "
                        "a mapping of the teacher's config keys")


def student_config(teacher_config, overrides: dict):
    """The teacher's transformers config with `overrides` applied (keys it must already have)."""
    known = teacher_config.to_dict()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        sizes = ", ".join(k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                      "num_key_value_heads") if k in known)
        raise UserError(f"{KEY}.{unknown[0]}: not a key of the teacher's config (model_type "
                        f"{teacher_config.model_type}); the ones that size it: {sizes}")
    new = copy.deepcopy(teacher_config)
    for k, v in overrides.items():
        setattr(new, k, v)
    t_heads = getattr(teacher_config, "num_attention_heads", None)
    if ("head_dim" not in overrides and any(k in overrides for k in SHAPE_KEYS) and t_heads
            and getattr(teacher_config, "head_dim", None) == teacher_config.hidden_size // t_heads):
        new.head_dim = new.hidden_size // new.num_attention_heads
    layer_types = getattr(teacher_config, "layer_types", None)
    if "layer_types" not in overrides and layer_types and "num_hidden_layers" in overrides:
        new.layer_types = list(layer_types[:new.num_hidden_layers])  # per-layer lists follow the depth
    return new


def build_student(spec, teacher, teacher_tok, seed: int):
    """(student model, description) for optimize.distill.student: preset:NAME (random weights,
    sized for the teacher's tokenizer), a mapping of the teacher's config keys (its architecture
    made smaller, random weights), or a pretrained model whose tokenizer must equal the teacher's."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(spec, dict):
        cfg = student_config(teacher.config, spec)
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(cfg)
        except (ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"{KEY}: the teacher's config with {spec} does not build a model: {e}") from None
        return model, "the teacher's architecture with " + ", ".join(f"{k}={v}" for k, v in spec.items())
    if spec.startswith("preset:"):
        name = spec.removeprefix("preset:")
        if name not in models.PRESETS:
            raise UserError(f"{KEY}: unknown preset {name!r}; expected one of: "
                            f"{', '.join('preset:' + p for p in models.PRESETS)}")
        return models.build_tiny_model(name, teacher_tok, seed=seed), f"{spec} (random weights)"
    model_cfg = config.ModelConfig(name_or_path=spec, method="full", dtype="float32")
    check_tokenizer(teacher_tok, models.load_tokenizer(model_cfg), spec)
    model = models.load_model(model_cfg, dtype="float32")
    if model.get_output_embeddings().weight.shape[0] < len(teacher_tok):
        raise UserError(f"{KEY}={spec}: its output layer has fewer rows than the tokenizer has tokens")
    return model, spec


def distill_config(cfg: RaylabConfig, nested: runs.Run) -> RaylabConfig:
    """The train-stage config of the student's training: the student in full, on the data
    stage's shards, with train.objective=distill for optimize.distill.steps steps, untracked."""
    d = cfg.optimize.distill
    raw = cfg.model_dump(mode="json")
    # optimize.distill stays: the objective reads temperature and alpha from it on every worker
    raw.update(output_dir=nested.root, tune=None, pretrain=None, optimize={"distill": raw["optimize"]["distill"]})
    raw["model"] = {k: raw["model"][k] for k in ("dtype", "attn_implementation")} | {
        "name_or_path": nested.base, "method": "full"}
    raw["train"].update(max_steps=d.steps, eval_every=max(1, d.steps // 2), checkpoint_every=None,
                        early_stopping_patience=None, log_every=max(1, d.steps // 10), objective="distill")
    if d.lr is not None:
        raw["train"]["lr"] = d.lr
    raw["registry"].update(enabled=False)  # registered below as a derived version, not as a train run
    return config.load_dict(raw)


def run_distill(cfg: RaylabConfig, store: registry.Store, parent) -> dict:
    """Distil the registered version `parent` (a ModelVersion) into the student
    `cfg.optimize.distill` names and register the result; returns {name, version, derived_from,
    method, student, teacher_parameters, parameters, steps, train_loss, val_loss,
    initial_val_loss, student_eval_loss (and _before: the untrained student's), teacher_eval_loss,
    kl_before, kl_after, size_bytes}."""
    from raylab.train import compare_to_teacher, run_train

    d = cfg.optimize.distill
    parent_ref = f"{parent.name}/{parent.version}"
    if "://" in cfg.output_dir:  # every worker loads teacher and student with from_pretrained, from a path
        raise UserError(f"output_dir {cfg.output_dir}: optimize.distill's workers load the teacher and the student "
                        "saved under <output_dir>/optimize/ from a path; use a local path or a shared mount")
    inf = models.load(parent_ref, dtype="float32", store=store)
    if getattr(inf.model.config, "quantization_config", None) is not None:
        raise UserError(f"--model {parent_ref}: its files are quantised (a quantization_config in config.json); "
                        "optimize.distill needs a float teacher: distil from the version it was derived from")
    run = runs.Run(cfg.output_dir)
    manifest = runs.read_manifest(run, cfg.source)
    if models.fingerprint(inf.tokenizer)["fingerprint"] != manifest.tokenizer.get("fingerprint"):
        raise UserError(f"--model {parent_ref}: the data shards in {run.data} were tokenized with another tokenizer; "
                        "the student trains on them: run `raylab data` with this model's tokenizer (or point "
                        "output_dir at the run that trained it)")
    teacher = inf.model.merge_and_unload() if inf.kind == "adapter" else inf.model
    teacher.eval()
    student, described = build_student(d.student, teacher, inf.tokenizer, cfg.train.seed)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in student.parameters())
    log.info(f"optimize: distilling {parent_ref} ({teacher_params:,} parameters) into {described} "
             f"({student_params:,} parameters) for {d.steps} steps, T={d.temperature}, alpha={d.alpha}")
    settings = d.model_dump(mode="json")
    nested = nested_run(cfg, run, manifest, "distill", parent, settings)
    storage.save_pretrained(teacher, nested.teacher)
    storage.save_pretrained(inf.tokenizer, nested.teacher)
    storage.save_pretrained(student, nested.base)
    storage.save_pretrained(inf.tokenizer, nested.base)  # the teacher's: the shards were rendered with it
    all_tokens = cfg.train.loss_on == "all"
    val = manifest.outputs["val"]
    before = compare_to_teacher(student.eval(), teacher, val, d.eval_samples, d.temperature, all_tokens)
    meta = run_train(distill_config(cfg, nested), track=False)
    trained = models.load(nested.train_final, dtype="float32", with_tokenizer=False).model
    after = compare_to_teacher(trained, teacher, val, d.eval_samples, d.temperature, all_tokens)
    m = meta["metrics"]
    derivation = f"distill:T={d.temperature:g}:alpha={d.alpha:g}"
    with tempfile.TemporaryDirectory(prefix="raylab-optimize-") as out:
        storage.copy_dir(nested.train_final, out)
        storage.write_text(runs.model_file(out, runs.TRAIN_META), json.dumps(meta | {
            "base_model": d.student if isinstance(d.student, str) else nested.base, "derived_from": parent_ref,
            "distilled": {"teacher": parent_ref, "student": described, "temperature": d.temperature,
                          "alpha": d.alpha, "teacher_parameters": teacher_params, "parameters": student_params,
                          "before": before, "after": after}}, indent=2) + "\n")
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(out) for f in files)
        tags = {DISTILLED_TAG: derivation.removeprefix("distill:"), "raylab.distill.teacher": parent_ref,
                "raylab.distill.student": described[:250], "raylab.distill.steps": str(meta["steps"]),
                "raylab.distill.val_loss": f"{after['student_loss']:.6g}",
                "raylab.distill.teacher_val_loss": f"{after['teacher_loss']:.6g}",
                "raylab.distill.kl": f"{after['kl']:.6g}", "raylab.parameters_before": str(teacher_params),
                "raylab.parameters": str(student_params), "raylab.size_bytes": str(size)}
        mv = registry.register_derived(store, parent, out, derivation=derivation, tags=tags,
                                       params={"optimize.distill." + k: json.dumps(v) if isinstance(v, dict) else str(v)
                                               for k, v in settings.items()}
                                       | {"optimize.distill.train_identity": meta["identity"]},
                                       output_dir=cfg.output_dir,
                                       card_sections={"Distillation": card_section(
                                           parent_ref, described, teacher_params, student_params, d, meta, before,
                                           after)})
    log.info(f"optimize: registered {mv.name}/{mv.version} ({student_params:,} parameters) distilled from {parent_ref}; "
             f"val cross-entropy {after['student_loss']:.4f} (teacher {after['teacher_loss']:.4f}), KL to the teacher "
             f"{before['kl']:.4f} -> {after['kl']:.4f}")
    return {"name": mv.name, "version": int(mv.version), "derived_from": parent_ref, "method": "distill",
            "student": described, "teacher_parameters": teacher_params, "parameters": student_params,
            "size_bytes": size, "steps": meta["steps"], "train_loss": m["train_loss"], "val_loss": m["val_loss"],
            "initial_val_loss": m["initial_val_loss"], "student_eval_loss": after["student_loss"],
            "student_eval_loss_before": before["student_loss"],
            "teacher_eval_loss": after["teacher_loss"], "kl_before": before["kl"], "kl_after": after["kl"]}


def card_section(parent_ref: str, described: str, teacher_params: int, student_params: int, d, meta: dict,
                 before: dict, after: dict) -> str:
    """The model card's Distillation section (Markdown): teacher, student, settings, losses."""
    m = meta["metrics"]
    return "\n".join([
        f"- Teacher: {parent_ref} (merged, float32), {teacher_params:,} parameters",
        f"- Student: {described}, {student_params:,} parameters ({student_params / teacher_params:.3f}x)",
        f"- Objective: alpha * T^2 * KL(teacher^T || student^T) + (1 - alpha) * cross-entropy on the label tokens; "
        f"T={d.temperature:g}, alpha={d.alpha:g}",
        f"- Training: Ray Train, {meta['steps']} steps, {meta['world_size']} worker(s); final train loss "
        f"{m['train_loss']:.4f}, val loss (the same objective) {m['initial_val_loss']:.4f} -> {m['val_loss']:.4f}",
        f"- Eval cross-entropy on {after['targets']} val tokens: student {after['student_loss']:.4f}, teacher "
        f"{after['teacher_loss']:.4f} (student before training {before['student_loss']:.4f})",
        f"- KL(teacher || student) at T={d.temperature:g} per token: {before['kl']:.4f} before -> {after['kl']:.4f} after",
    ])
