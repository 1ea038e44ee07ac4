"""Sequence-level distillation (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation"): the
teacher answers the train split's prompts greedily and the student learns those answers with
plain cross-entropy, so the two need not share a tokenizer (logit distillation compares
distributions over one vocabulary and cannot). distill.py runs it when
`optimize.distill.level` is `sequence`, or `auto` with a student whose tokenizer differs:

    raylab optimize configs/quickstart.yaml --model acme-assistant/3 \
        optimize.distill.student=/models/small-lm optimize.distill.steps=200

The pieces, in the order distill.py uses them: `prompts` (the data stage's records as
generation prompts), the teacher's answers (`raylab.evaluate.answers`: a Ray Data actor
pool), `teacher_corpus` + `write_corpus` (the answers as chat / completion JSONL in the
nested run), `data_config` (the student's own data stage over that JSONL: validation, PII
redaction, dedup and tokenization with the student's tokenizer, the teacher's outputs being
new text), `train_config` (a full fine-tune of the student on Ray Train), `agreement` (ROUGE-L
of the student's answers to the teacher's and to the references on val prompts: per-token
losses are not comparable across tokenizers).
"""

from __future__ import annotations

import json

from raylab import config, evaluate
from raylab.config import RaylabConfig
from raylab.core import runs, storage


def prompts(records: str, split: str, prompt_words: int, limit: int | None) -> list[dict]:
    """The split's records (the data stage's records table at `records`) as generation prompts,
    by record id (`raylab.evaluate.record_prompts`): a chat or instruction record's conversation
    up to its last assistant turn, {id, messages, reference}; a completion record's first
    `prompt_words` words, {id, text, reference: the rest}, which the teacher continues."""
    return evaluate.record_prompts(records, split, prompt_words, limit)


def teacher_corpus(items: list[dict], outputs: list[str]) -> tuple[list[dict], list[dict], int]:
    """(chat records, completion records, empty answers): each prompt with the teacher's answer
    in place of the record's own (an empty answer teaches nothing and is left out, counted)."""
    chats, texts, empty = [], [], 0
    for item, out in zip(items, outputs, strict=True):
        if not out.strip():
            empty += 1
        elif "messages" in item:
            chats.append({"messages": [*item["messages"], {"role": "assistant", "content": out}]})
        else:
            # `greedy` strips the continuation, so the separating space is put back (a continuation that
            # began mid-word gains one: the student learns the teacher's words, not its whitespace)
            texts.append({"text": f"{item['text']} {out}"})
    return chats, texts, empty


def write_corpus(nested: runs.Run, chats: list[dict], texts: list[dict], summary: dict) -> list[dict]:
    """Write the teacher's corpus into the nested run (the summary last) and return the
    data.sources that read it."""
    sources = []
    for rows, fmt in ((chats, "chat"), (texts, "completion")):
        if rows:
            path = nested.teacher_file(fmt)
            storage.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            # the default field names ("messages", "text") whatever data.fields renames for the user's sources
            sources.append({"type": "jsonl", "path": path, "name": f"teacher-{fmt}", "format": fmt, "fields": {}})
    # the summary last: a re-run with the same settings finds it and reuses the answers
    storage.write_text(nested.teacher_file("summary"), json.dumps(summary | {"sources": sources}, indent=2) + "\n")
    return sources


def written(nested: runs.Run, settings: dict) -> dict | None:
    """The summary of a corpus an earlier run with these settings wrote, or None."""
    path = nested.teacher_file("summary")
    if not storage.exists(path):
        return None
    summary = json.loads(storage.read_text(path))
    return summary if summary.get("settings") == settings else None


def _nested_raw(cfg: RaylabConfig, nested: runs.Run, student_dir: str) -> dict:
    raw = cfg.model_dump(mode="json")
    raw.update(output_dir=nested.root, tune=None, pretrain=None, optimize={})
    # the student with its own tokenizer and chat template: the data stage renders the teacher's answers with them
    raw["model"] = {k: raw["model"][k] for k in ("dtype", "attn_implementation")} | {
        "name_or_path": student_dir, "method": "full"}
    raw["registry"].update(enabled=False)  # registered by distill.py as a derived version, not as a train run
    return raw


def data_config(cfg: RaylabConfig, nested: runs.Run, student_dir: str, sources: list[dict]) -> RaylabConfig:
    """The student's data stage: the teacher's corpus as its only sources, the rest of the
    data section (PII, dedup, packing, the random split) as the config says; the rules that
    name the user's own sources or fields (val_sources, validation.required) do not apply to it."""
    raw = _nested_raw(cfg, nested, student_dir)
    raw["data"].update(sources=sources, val_sources=[])
    raw["data"]["validation"]["required"] = []
    return config.load_dict(raw)


def train_config(cfg: RaylabConfig, nested: runs.Run, student_dir: str, sources: list[dict]) -> RaylabConfig:
    """The student's training: a full fine-tune with cross-entropy (the train section's
    objective and settings) for optimize.distill.steps steps, untracked."""
    d = cfg.optimize.distill
    raw = data_config(cfg, nested, student_dir, sources).model_dump(mode="json")  # the manifest's inputs
    raw["train"].update(max_steps=d.steps, eval_every=max(1, d.steps // 2), checkpoint_every=None,
                        early_stopping_patience=None, log_every=max(1, d.steps // 10))
    if d.lr is not None:
        raw["train"]["lr"] = d.lr
    return config.load_dict(raw)


def agreement(answers: list[str], teacher_answers: list[str], items: list[dict]) -> dict:
    """ROUGE-L of `answers` to the teacher's answers and to the records' own references, on
    the same prompts: {rouge_l_to_teacher, rouge_l_to_reference, prompts}."""
    to_teacher = evaluate.score(answers, [{"reference": t} for t in teacher_answers])
    to_reference = evaluate.score(answers, items)
    return {"rouge_l_to_teacher": to_teacher.get("rouge_l"), "rouge_l_to_reference": to_reference.get("rouge_l"),
            "prompts": len(items)}
