"""The datasheet answers Gebru et al.'s sections from the manifest: its counts are the
manifest's, written beside it in the run directory; a changed count changes the datasheet."""

from __future__ import annotations

import json
from pathlib import Path

from manifests import card_cfg, manifest_for
from raylab.core import runs
from raylab.data import datasheet

SECTIONS = ["Motivation", "Composition", "Collection process", "Preprocessing, cleaning, labeling", "Uses",
            "Distribution", "Maintenance"]


def counts_agree(sheet: dict, manifest: runs.DataManifest) -> bool:
    """Every count the datasheet states is the manifest's."""
    c = manifest.counts
    return (sheet["counts"] == {"read": c.read, "accepted": c.accepted, "rejected": c.rejected,
                                "duplicates": c.duplicates, "erased": runs.erased_count(c),
                                "rejected_by_reason": c.rejected_by_reason}
            and sheet["by_source"] == manifest.by_source and sheet["pii_found"] == manifest.pii_redactions
            and sheet["splits"] == {"train": manifest.tokens.train.documents, "val": manifest.tokens.val.documents})


def test_the_datasheet_answers_every_section_with_the_manifests_counts(tmp_path):
    cfg = card_cfg(tmp_path)
    manifest = runs.DataManifest.model_validate(manifest_for(tmp_path))
    run = runs.Run(cfg.output_dir)
    md = datasheet.write(run, manifest, cfg)
    sheet = json.loads(Path(run.datasheet("json")).read_text())
    assert md == run.datasheet("md") and Path(md).parent == Path(run.manifest).parent
    assert list(sheet["sections"]) == SECTIONS and all(qa["answer"] for s in SECTIONS for qa in sheet["sections"][s])
    assert counts_agree(sheet, manifest)
    text = Path(md).read_text()
    for needed in ("12 records read; 8 accepted (7 in the train split, 1 in the val split), 1 rejected, "
                   "2 dropped as duplicates, 1 erased", "EMAIL 3, PERSON 2", "too_short 1",
                   "| support | 6 | 3 | 0 | 2 | 1 |", "To fine-tune widgets: Answer widget questions.",
                   "Medical advice.", manifest.inputs[0]["files"][0]["sha256"]):
        assert needed in text, needed
    assert "Who funded the creation of the dataset?**\n\nNot recorded by raylab." in text  # said, not guessed


def test_a_changed_count_is_caught(tmp_path):  # negative control: the comparison has teeth
    cfg = card_cfg(tmp_path)
    manifest = runs.DataManifest.model_validate(manifest_for(tmp_path))
    sheet = datasheet.build(manifest, cfg)
    changed = manifest_for(tmp_path)
    changed["by_source"]["support"]["duplicates"] = 1
    other = runs.DataManifest.model_validate(changed)
    assert not counts_agree(sheet, other)
    assert datasheet.render(datasheet.build(other, cfg)) != datasheet.render(sheet)
