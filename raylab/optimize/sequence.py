"""Sequence-level distillation (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation"): the
teacher answers the train split's prompts greedily and the student learns those answers with
plain cross-entropy, so the two need not share a tokenizer (logit distillation compares
distributions over one vocabulary and cannot). distill.py runs it when
`optimize.distill.level` is `sequence`, or `auto` with a student whose tokenizer differs:

    raylab optimize configs/quickstart.yaml --model acme-assistant/3 \
        optimize.distill.student=/models/small-lm optimize.distill.steps=200

The pieces, in the order distill.py uses them: the data stage's records as generation prompts
(`raylab.evaluate.record_prompts`), the teacher's answers (`raylab.evaluate.answers`: a Ray
Data actor pool), `teacher_corpus` + `write_corpus` (the answers as chat / completion JSONL in
the nested run), `student_config` (the student's own data stage over that JSONL: validation,
PII redaction, dedup and tokenization with the student's tokenizer, the teacher's outputs
being new text; then a full fine-tune on Ray Train), `agreement` (ROUGE-L of the student's
answers to the teacher's and to the references on val prompts: per-token losses are not
comparable across tokenizers).
"""

from __future__ import annotations

import json

from raylab import config, evaluate
from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.optimize.recover import nested_train_raw


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


def write_corpus(nested: runs.Run, chats: list[dict], texts: list[dict], summary: dict) -> dict:
    """Write the teacher's corpus into the nested run (the summary last) and return the summary
    with the data.sources that read it (what `written` finds again)."""
    sources = []
    for rows, fmt in ((chats, "chat"), (texts, "completion")):
        if rows:
            path = nested.teacher_file(fmt)
            storage.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            # the default field names ("messages", "text") whatever data.fields renames for the user's sources
            sources.append({"type": "jsonl", "path": path, "name": f"teacher-{fmt}", "format": fmt, "fields": {}})
    # the summary last: a re-run with the same settings finds it and reuses the answers
    summary = summary | {"sources": sources}
    storage.write_text(nested.teacher_file("summary"), json.dumps(summary, indent=2) + "\n")
    return summary


def written(nested: runs.Run, settings: dict) -> dict | None:
    """The summary of a corpus an earlier run with these settings wrote, or None."""
    path = nested.teacher_file("summary")
    if not storage.exists(path):
        return None
    summary = json.loads(storage.read_text(path))
    return summary if summary.get("settings") == settings else None


def student_config(cfg: RaylabConfig, nested: runs.Run, sources: list[dict]) -> RaylabConfig:
    """The student's data stage and training, one config (the manifest's inputs must match): the
    teacher's corpus as the only sources, read with the student's tokenizer and chat template
    (nested.base), the rest of the data section (PII, dedup, packing, the random split) as the
    config says, but not the rules that name the user's own sources or fields (val_sources,
    validation.required); a full fine-tune with the train section's objective (cross-entropy) for
    optimize.distill.steps steps, untracked."""
    d = cfg.optimize.distill
    raw = nested_train_raw(cfg, nested, d.steps, d.lr)
    raw["data"].update(sources=sources, val_sources=[])
    raw["data"]["validation"]["required"] = []
    return config.load_dict(raw)


def agreement(answers: list[str], teacher_answers: list[str], items: list[dict]) -> dict:
    """ROUGE-L of `answers` to the teacher's answers and to the records' own references, on
    the same prompts: {rouge_l_to_teacher, rouge_l_to_reference, prompts}."""
    to_teacher = evaluate.score(answers, [{"reference": t} for t in teacher_answers])
    to_reference = evaluate.score(answers, items)
    return {"rouge_l_to_teacher": to_teacher.get("rouge_l"), "rouge_l_to_reference": to_reference.get("rouge_l"),
            "prompts": len(items)}
