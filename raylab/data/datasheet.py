"""A datasheet per data run: Gebru et al.'s "Datasheets for Datasets" questions (motivation,
composition, collection process, preprocessing/cleaning/labeling, uses, distribution,
maintenance), answered from the data manifest and the config that produced it.

    raylab data configs/quickstart.yaml     # writes data/datasheet.md and data/datasheet.json
    from raylab.data.datasheet import build, render
    sheet = build(manifest, cfg)             # {section: [{question, answer}], counts: ...}

The data stage writes both files beside `manifest.json` at its end (and on a cache hit when
they are missing). Every number is the manifest's own (`counts`, `by_source`, `pii_redactions`,
`tokens`), so the datasheet cannot disagree with the manifest; a question the manifest cannot
answer (funding, consent, the licence of the sources) says so rather than guess.
"""

from __future__ import annotations

import json
from typing import Any

from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.data.sources import source_name

NOT_RECORDED = "Not recorded by raylab"


def build(manifest: runs.DataManifest, cfg: RaylabConfig) -> dict[str, Any]:
    """The datasheet's facts: the manifest's counts and the answers, by Gebru et al.'s sections."""
    d, card, c = cfg.data, cfg.governance.card, manifest.counts
    formats = {source_name(i, s): s.format or d.format for i, s in enumerate(d.sources)}
    train, val = manifest.tokens.train, manifest.tokens.val
    erased = runs.erased_count(c)
    dups = sum(c.duplicates.values())
    sources = "; ".join(f"{i['name']} ({i['type']}, {formats.get(i['name'], d.format)} format, "
                        f"{manifest.by_source.get(i['name'], {}).get('read', 0):,} records read from {i.get('location')})"
                        for i in manifest.inputs) or "none"
    files = [f"{i['name']}: {f['path']} sha256 {f['sha256']}" for i in manifest.inputs for f in i.get("files", [])]
    pii = ", ".join(f"{k} {v:,}" for k, v in sorted(manifest.pii_redactions.items())) or "none found"
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(c.rejected_by_reason.items())) or "none"
    answers = {
        "Motivation": [
            ("For what purpose was the dataset created?",
             card.intended_use and f"To fine-tune {cfg.registry.model_name or 'a model'}: {card.intended_use}"
             or f"To fine-tune {cfg.model.name_or_path} ({NOT_RECORDED.lower()} beyond that: set governance.card.intended_use)"),
            ("Who created the dataset?", ", ".join(card.authors) or f"{NOT_RECORDED}: set governance.card.authors"),
            ("Who funded the creation of the dataset?", NOT_RECORDED + "."),
        ],
        "Composition": [
            ("What do the instances represent?",
             f"Training records in these sources: {sources}. Instruction and chat records are conversations whose "
             "assistant turns are the training targets; completion records are plain text."),
            ("How many instances are there?",
             f"{c.read:,} records read; {c.accepted:,} accepted ({train.documents:,} in the train split, "
             f"{val.documents:,} in the val split), {c.rejected:,} rejected, {dups:,} dropped as duplicates, "
             f"{erased:,} erased."),
            ("Is it a sample of a larger set?",
             f"It is every record the sources held when read; the val split is a seeded {d.val_fraction:g} share "
             f"(data.seed {d.seed})."),
            ("Are there recommended data splits?",
             f"train: {train.documents:,} documents, {train.tokens:,} tokens, {train.sequences:,} packed sequences; "
             f"val: {val.documents:,} documents, {val.tokens:,} tokens, {val.sequences:,} packed sequences."),
            ("Are there errors, sources of noise or redundancies?",
             f"Rejected records (reasons: {reasons}) are kept in the quarantine split, not trained on; "
             f"duplicates removed: {', '.join(f'{k} {v:,}' for k, v in c.duplicates.items())}."),
            ("Does the dataset contain data that might be considered confidential or personal?",
             f"Personal data found and redacted, by type: {pii}"
             + ("" if d.pii.enabled else " (data.pii.enabled is false: nothing was redacted)") + "."),
            ("Is the dataset self-contained?",
             "It was read from these files (sha256 at read time): " + "; ".join(files) if files else
             "No file inputs (SQL or HTTP sources): what they return may change after this run."),
        ],
        "Collection process": [
            ("How was the data acquired?", f"Read by raylab's data stage from: {sources}."),
            ("Over what timeframe was the data collected?",
             f"Read on {manifest.created}; when the records themselves were written is {NOT_RECORDED.lower()}."),
            ("Were the individuals concerned notified, and did they consent?", NOT_RECORDED + "."),
        ],
        "Preprocessing, cleaning, labeling": [
            ("Was any preprocessing, cleaning or labeling done?",
             f"Records were normalised to their format and validated ({c.rejected:,} rejected: {reasons}); "
             f"personal data was redacted ({pii}); duplicates were removed ({dups:,}); records on the erasure "
             f"suppression list were dropped ({erased:,}); the rest were tokenized with tokenizer "
             f"{manifest.tokenizer.get('fingerprint')} and packed into {manifest.tokens.max_seq_len}-token sequences."),
            ("Was the raw data saved?",
             "The accepted records (after redaction) and the quarantine (rejected records, with reasons) are "
             "kept in the run's data directory; the sources themselves are not copied."),
        ],
        "Uses": [
            ("What tasks has the dataset been used for?", f"Fine-tuning {cfg.model.name_or_path} ({cfg.model.method})."),
            ("Are there tasks for which the dataset should not be used?",
             card.out_of_scope_use or f"{NOT_RECORDED}: set governance.card.out_of_scope_use"),
        ],
        "Distribution": [
            ("Will the dataset be distributed to third parties?",
             "raylab does not distribute it: it stays in the run directory and is reachable only by who can "
             "read that directory."),
            ("Under what licence?", card.license or f"{NOT_RECORDED}: the sources' licences are the owner's to state"),
        ],
        "Maintenance": [
            ("Who maintains the dataset, and how can they be contacted?",
             card.contact or f"{NOT_RECORDED}: set governance.card.contact"),
            ("Will the dataset be updated?",
             "Re-running the data stage re-reads the sources; unchanged file inputs, data config and suppression "
             f"list are a cache hit (cache key {manifest.cache_key or 'none: SQL or HTTP inputs are always re-read'})."),
            ("Can individuals have their data removed?",
             f"Yes: `raylab erase` adds a record to the suppression list; the next data run drops it ({erased:,} "
             "dropped in this run) and versions trained on it are marked."),
        ],
    }
    return {"manifest_hash": runs.manifest_hash(manifest), "created": manifest.created,
            "counts": {"read": c.read, "accepted": c.accepted, "rejected": c.rejected, "duplicates": dict(c.duplicates),
                       "erased": erased, "rejected_by_reason": dict(c.rejected_by_reason)},
            "by_source": {k: dict(v) for k, v in manifest.by_source.items()},
            "pii_found": dict(manifest.pii_redactions),
            "splits": {"train": train.documents, "val": val.documents},
            "sections": {s: [{"question": q, "answer": a} for q, a in qa] for s, qa in answers.items()}}


def render(sheet: dict[str, Any]) -> str:
    lines = [f"# Datasheet: data manifest {sheet['manifest_hash']}", "",
             f"Written by raylab's data stage on {sheet['created']}, after Gebru et al., \"Datasheets for Datasets\".", ""]
    for section, qas in sheet["sections"].items():
        lines += [f"## {section}", ""]
        for qa in qas:
            lines += [f"**{qa['question']}**", "", qa["answer"], ""]
    lines += ["## Counts by source", "", "| source | read | accepted | rejected | duplicates | erased |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {v.get('read', 0):,} | {v.get('accepted', 0):,} | {v.get('rejected', 0):,} | "
              f"{v.get('duplicates', 0):,} | {v.get('erased', 0):,} |" for n, v in sheet["by_source"].items()]
    return "\n".join(lines) + "\n"


def write(run: runs.Run, manifest: runs.DataManifest, cfg: RaylabConfig) -> str:
    """data/datasheet.json and data/datasheet.md beside the manifest; returns the Markdown's location."""
    sheet = build(manifest, cfg)
    storage.write_text(run.datasheet("json"), json.dumps(sheet, indent=2) + "\n")
    return storage.write_text(run.datasheet("md"), render(sheet))
