"""`raylab optimize CONFIG --model REF optimize.distill.student=...`: knowledge distillation of a
registered version (the teacher, merged) into a smaller student trained on Ray Train with the
train objective `distill` (raylab/train/distill.py), registered as a version derived from REF.

    raylab data configs/quickstart.yaml          # the shards the student trains on (already there after `raylab run`)
    raylab optimize configs/quickstart.yaml --model acme-assistant/3 \
        'optimize.distill.student={num_hidden_layers: 2}' optimize.distill.steps=200 optimize.distill.lr=3e-3
    raylab models show acme-assistant/4          # raylab.derived_from acme-assistant/3, raylab.distilled ...

Steps: refuse what cannot work before training (a URI output_dir, a quantised REF, no data
stage output; for logit distillation shards tokenized with another tokenizer than REF's, or a
student whose tokenizer differs from the teacher's, since it compares distributions over one
vocabulary); load REF in float32 and merge an adapter into its base; build the student
(`build_student`); save teacher and student as teacher/ and base/ of a nested run
`<output_dir>/optimize/distill-<name>-<version>-<hash>/`; then either (logits) run the train
stage on the data stage's shards with train.objective=distill (`raylab.train.run_train`: method
full, optimize.distill.steps steps, untracked; multi-worker and resumable like any train run)
and compare teacher and student on the val split, or (sequence, sequence.py) have the teacher
answer the train split's prompts, run the student's own data stage on those answers and train
it with cross-entropy, and compare their answers on val prompts; register the student's final/
with the lineage, parameter counts, losses and a card section.
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
from raylab.optimize import sequence
from raylab.optimize.recover import nested_run, nested_train_raw

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
                        "distillation (optimize.distill.level: logits) needs the teacher's tokenizer: set "
                        "optimize.distill.level: sequence (or auto) to train it on the teacher's answers instead, "
                        "or choose a student of the same family and tokenizer, preset:NAME, or a mapping of the "
                        "teacher's config keys")


def student_tokenizer(spec, teacher_tok):
    """The tokenizer the student has: the teacher's for a mapping or a preset (built around it),
    a pretrained student's own (read before any weights are loaded)."""
    if isinstance(spec, dict) or spec.startswith("preset:"):
        return teacher_tok
    return models.load_tokenizer(config.ModelConfig(name_or_path=spec, method="full", dtype="float32"))


def choose_level(level: str, teacher_tok, student_tok, spec) -> str:
    """logits or sequence: optimize.distill.level, `auto` resolved by whether the tokenizers match
    (logits with differing tokenizers exits 2, naming optimize.distill.student)."""
    if level == "logits":
        check_tokenizer(teacher_tok, student_tok, spec)
        return level
    if level == "sequence":
        return level
    return "sequence" if tokenizer_mismatch(teacher_tok, student_tok) else "logits"


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


def build_student(spec, teacher, teacher_tok, seed: int, student_tok=None):
    """(student model, description) for optimize.distill.student: preset:NAME (random weights,
    sized for the teacher's tokenizer), a mapping of the teacher's config keys (its architecture
    made smaller, random weights), or a pretrained model whose tokenizer must equal the teacher's
    (unless `student_tok`, its own, is given: sequence-level distillation)."""
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
    if student_tok is None:
        check_tokenizer(teacher_tok, models.load_tokenizer(model_cfg), spec)
    model = models.load_model(model_cfg, dtype="float32")
    if model.get_output_embeddings().weight.shape[0] < len(student_tok or teacher_tok):
        raise UserError(f"{KEY}={spec}: its output layer has fewer rows than the tokenizer has tokens")
    return model, spec


def distill_config(cfg: RaylabConfig, nested: runs.Run) -> RaylabConfig:
    """The train-stage config of the student's training: the student in full, on the data
    stage's shards, with train.objective=distill for optimize.distill.steps steps, untracked."""
    d = cfg.optimize.distill
    # optimize.distill stays: the objective reads temperature and alpha from it on every worker
    raw = nested_train_raw(cfg, nested, d.steps, d.lr, optimize={"distill": d.model_dump(mode="json")})
    raw["train"]["objective"] = "distill"
    return config.load_dict(raw)


def run_distill(cfg: RaylabConfig, store: registry.Store, parent) -> dict:
    """Distil the registered version `parent` (a ModelVersion) into the student
    `cfg.optimize.distill` names and register the result; returns {name, version, derived_from,
    method, level, student, teacher_parameters, parameters, steps, train_loss, val_loss,
    initial_val_loss, size_bytes} and, for logit distillation, student_eval_loss (and _before:
    the untrained student's), teacher_eval_loss, kl_before, kl_after; for sequence-level
    distillation, the teacher corpus's counts and the student's ROUGE-L agreement with the
    teacher before and after (sequence.agreement)."""
    d = cfg.optimize.distill
    parent_ref = f"{parent.name}/{parent.version}"
    if "://" in cfg.output_dir:  # every worker loads the teacher and the student from a path
        raise UserError(f"output_dir {cfg.output_dir}: optimize.distill's workers load the teacher and the student "
                        "saved under <output_dir>/optimize/ from a path; use a local path or a shared mount")
    inf = models.load(parent_ref, dtype="float32", store=store)
    if getattr(inf.model.config, "quantization_config", None) is not None:
        raise UserError(f"--model {parent_ref}: its files are quantised (a quantization_config in config.json); "
                        "optimize.distill needs a float teacher: distil from the version it was derived from")
    run = runs.Run(cfg.output_dir)
    manifest = runs.read_manifest(run, cfg.source)
    student_tok = student_tokenizer(d.student, inf.tokenizer)
    level = choose_level(d.level, inf.tokenizer, student_tok, d.student)
    if level == "logits" and models.fingerprint(inf.tokenizer)["fingerprint"] != manifest.tokenizer.get("fingerprint"):
        raise UserError(f"--model {parent_ref}: the data shards in {run.data} were tokenized with another tokenizer; "
                        "the student trains on them: run `raylab data` with this model's tokenizer (or point "
                        "output_dir at the run that trained it)")
    teacher = inf.model.merge_and_unload() if inf.kind == "adapter" else inf.model
    teacher.eval()
    student, described = build_student(d.student, teacher, inf.tokenizer, cfg.train.seed,
                                       student_tok if level == "sequence" else None)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in student.parameters())
    log.info(f"optimize: distilling {parent_ref} ({teacher_params:,} parameters) into {described} "
             f"({student_params:,} parameters) for {d.steps} steps, "
             + (f"T={d.temperature}, alpha={d.alpha}" if level == "logits" else "sequence-level (the teacher's answers)"))
    settings = d.model_dump(mode="json") | {"level": level}
    nested = nested_run(cfg, run, manifest, "distill", parent, settings, copy_manifest=level == "logits")
    storage.save_pretrained(teacher, nested.teacher)
    storage.save_pretrained(inf.tokenizer, nested.teacher)
    storage.save_pretrained(student, nested.base)
    # logits: the teacher's tokenizer (the shards were rendered with it); sequence: the student's own
    storage.save_pretrained(student_tok if level == "sequence" else inf.tokenizer, nested.base)
    sizes = {"teacher_parameters": teacher_params, "parameters": student_params}
    if level == "sequence":
        meta, extra, tags, section = _sequence(cfg, parent_ref, run, manifest, nested, described, settings, sizes)
    else:
        meta, extra, tags, section = _logits(cfg, parent_ref, manifest, nested, teacher, student, described, sizes)
    m = meta["metrics"]
    derivation = (f"distill:T={d.temperature:g}:alpha={d.alpha:g}" if level == "logits"
                  else f"distill:sequence:max_new_tokens={d.max_new_tokens}")
    with tempfile.TemporaryDirectory(prefix="raylab-optimize-") as out:
        storage.copy_dir(nested.train_final, out)
        storage.write_text(runs.model_file(out, runs.TRAIN_META), json.dumps(meta | {
            "base_model": d.student if isinstance(d.student, str) else nested.base, "derived_from": parent_ref,
            "distilled": {"teacher": parent_ref, "student": described, "level": level} | sizes | extra}, indent=2)
            + "\n")
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(out) for f in files)
        tags = {DISTILLED_TAG: derivation.removeprefix("distill:"), "raylab.distill.teacher": parent_ref,
                "raylab.distill.level": level, "raylab.distill.student": described[:250],
                "raylab.distill.steps": str(meta["steps"]), "raylab.parameters_before": str(teacher_params),
                "raylab.parameters": str(student_params), "raylab.size_bytes": str(size)} | tags
        mv = registry.register_derived(store, parent, out, derivation=derivation, tags=tags,
                                       params={"optimize.distill." + k: json.dumps(v) if isinstance(v, dict) else str(v)
                                               for k, v in settings.items()}
                                       | {"optimize.distill.train_identity": meta["identity"]},
                                       output_dir=cfg.output_dir, card_sections={"Distillation": section(meta)})
    log.info(f"optimize: registered {mv.name}/{mv.version} ({student_params:,} parameters) distilled from {parent_ref}")
    return {"name": mv.name, "version": int(mv.version), "derived_from": parent_ref, "method": "distill",
            "level": level, "student": described, "size_bytes": size, "steps": meta["steps"],
            "train_loss": m["train_loss"], "val_loss": m["val_loss"], "initial_val_loss": m["initial_val_loss"]} \
        | sizes | extra


def _logits(cfg: RaylabConfig, parent_ref: str, manifest, nested: runs.Run, teacher, student, described: str,
            sizes: dict) -> tuple:
    """Logit distillation on the data stage's shards: (train meta, result fields, tags, card section)."""
    from raylab.train import compare_to_teacher, run_train

    d = cfg.optimize.distill
    all_tokens = cfg.train.loss_on == "all"
    val = manifest.outputs["val"]
    before = compare_to_teacher(student.eval(), teacher, val, d.eval_samples, d.temperature, all_tokens)
    meta = run_train(distill_config(cfg, nested), track=False)
    trained = models.load(nested.train_final, dtype="float32", with_tokenizer=False).model
    after = compare_to_teacher(trained, teacher, val, d.eval_samples, d.temperature, all_tokens)
    log.info(f"optimize: val cross-entropy {after['student_loss']:.4f} (teacher {after['teacher_loss']:.4f}), "
             f"KL to the teacher {before['kl']:.4f} -> {after['kl']:.4f}")
    extra = {"temperature": d.temperature, "alpha": d.alpha, "before": before, "after": after,
             "student_eval_loss": after["student_loss"], "student_eval_loss_before": before["student_loss"],
             "teacher_eval_loss": after["teacher_loss"], "kl_before": before["kl"], "kl_after": after["kl"]}
    tags = {"raylab.distill.val_loss": f"{after['student_loss']:.6g}",
            "raylab.distill.teacher_val_loss": f"{after['teacher_loss']:.6g}", "raylab.distill.kl": f"{after['kl']:.6g}"}
    return meta, extra, tags, lambda meta: card_section(parent_ref, described, sizes["teacher_parameters"],
                                                        sizes["parameters"], d, meta, before, after)


def _sequence(cfg: RaylabConfig, parent_ref: str, run: runs.Run, manifest, nested: runs.Run, described: str,
              settings: dict, sizes: dict) -> tuple:
    """Sequence-level distillation (sequence.py): the teacher answers the train split's prompts,
    the student's own data stage reads the answers, the student learns them with cross-entropy;
    (train meta, result fields, tags, card section)."""
    from raylab import data, evaluate
    from raylab.core import cluster
    from raylab.train import run_train

    d = cfg.optimize.distill
    records = manifest.outputs.get("records") or run.split("records")
    val_items = evaluate.record_prompts(records, "val", d.prompt_words, cfg.eval.max_samples)
    cluster.connect(cfg)
    corpus = sequence.written(nested, settings)
    if corpus is None:
        items = evaluate.record_prompts(records, "train", d.prompt_words, d.max_prompts)
        if not items:
            raise UserError(f"optimize.distill.level: sequence needs prompts, and the train split of {records} has "
                            "no chat or instruction record and no completion record longer than "
                            f"optimize.distill.prompt_words ({d.prompt_words} words)")
        # one actor pool (one teacher load) answers the train prompts and the val prompts compared below
        answers = evaluate.answers(cfg, nested.teacher, nested.teacher, items + val_items,
                                   max_new_tokens=d.max_new_tokens)
        answers, teacher_val = answers[:len(items)], answers[len(items):]
        chats, texts, empty = sequence.teacher_corpus(items, answers)
        if not chats and not texts:
            raise UserError(f"--model {parent_ref}: the teacher's answers to all {len(items)} prompts are empty (it "
                            "ends its turn at once): nothing to distil; check the teacher with `raylab eval`")
        counts = {"prompts": len(items), "chat": len(chats), "completion": len(texts), "empty": empty}
        corpus = sequence.write_corpus(nested, chats, texts, {"settings": settings, "counts": counts})
        log.info(f"optimize: the teacher answered {len(items)} prompts ({empty} empty answers left out)")
    else:
        teacher_val = evaluate.answers(cfg, nested.teacher, nested.teacher, val_items, max_new_tokens=d.max_new_tokens)
    student_cfg = sequence.student_config(cfg, nested, corpus["sources"])
    data.run_data(student_cfg)
    student_val = evaluate.answers(cfg, nested.base, nested.base, val_items, max_new_tokens=d.max_new_tokens)
    before = sequence.agreement(student_val, teacher_val, val_items)
    meta = run_train(student_cfg, track=False)
    student_val = evaluate.answers(cfg, nested.train_final, nested.base, val_items, max_new_tokens=d.max_new_tokens)
    after = sequence.agreement(student_val, teacher_val, val_items)
    teacher_ref = evaluate.score(teacher_val, val_items).get("rouge_l")
    log.info(f"optimize: the student's answers to {len(val_items)} val prompts: ROUGE-L to the teacher's "
             f"{_f(before['rouge_l_to_teacher'])} -> {_f(after['rouge_l_to_teacher'])}, to the references "
             f"{_f(after['rouge_l_to_reference'])} (the teacher's {_f(teacher_ref)})")
    extra = {"corpus": corpus["counts"], "before": before, "after": after, "teacher_rouge_l_to_reference": teacher_ref}
    tags = {"raylab.distill.rouge_l_to_teacher": _f(after["rouge_l_to_teacher"]),
            "raylab.distill.prompts": str(corpus["counts"]["prompts"])}
    return meta, extra, tags, lambda meta: sequence_card_section(parent_ref, described, sizes, d, meta,
                                                                 corpus["counts"], before, after, teacher_ref)


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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


def sequence_card_section(parent_ref: str, described: str, sizes: dict, d, meta: dict, counts: dict, before: dict,
                          after: dict, teacher_ref: float | None) -> str:
    """The model card's Distillation section for sequence-level distillation (Markdown)."""
    m = meta["metrics"]
    t, p = sizes["teacher_parameters"], sizes["parameters"]
    return "\n".join([
        f"- Teacher: {parent_ref} (merged, float32), {t:,} parameters",
        f"- Student: {described}, {p:,} parameters ({p / t:.3f}x), its own tokenizer",
        "- Objective: sequence-level distillation (Kim & Rush 2016): cross-entropy on the teacher's greedy answers "
        f"(at most {d.max_new_tokens} tokens) to {counts['prompts']} train-split prompts ({counts['chat']} chat, "
        f"{counts['completion']} completion continuations from their first {d.prompt_words} words; {counts['empty']} "
        "empty answers left out), read by the student's own data stage",
        f"- Training: Ray Train, {meta['steps']} steps, {meta['world_size']} worker(s); final train loss "
        f"{m['train_loss']:.4f}, val loss (on the teacher's answers) {m['initial_val_loss']:.4f} -> {m['val_loss']:.4f}",
        f"- Agreement on {after['prompts']} val prompts, ROUGE-L of the student's answers to the teacher's: "
        f"{_f(before['rouge_l_to_teacher'])} before -> {_f(after['rouge_l_to_teacher'])} after; to the references "
        f"{_f(after['rouge_l_to_reference'])} (the teacher's {_f(teacher_ref)})",
        "- Per-token losses are not compared with the teacher's (with another tokenizer they would not be comparable)",
    ])
