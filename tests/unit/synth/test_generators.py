"""What the generators read (a data run's records, plain files, seeds, evaluation texts) and
Self-Instruct's in-context prompt (6 seed + 2 generated tasks)."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raylab import config
from raylab.core import runs
from raylab.errors import UserError
from raylab.synth import generators


def _data_run(tmp_path, sources=({"type": "jsonl", "path": "a.jsonl", "name": "docs"},)):
    """A data run's records split as the data stage writes it (two train records, one val),
    and its config.resolved.yaml (the sources' org/acl)."""
    records = tmp_path / "run"
    split = records / "data" / "records"
    split.mkdir(parents=True)
    assert runs.Run(str(records)).split("records") == str(split)
    (records / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {"sources": list(sources)}}))
    rows = [{"source": "docs", "record_id": "a.jsonl:1", "format": "completion", "text": "Widgets ship in two days.",
             "messages": "", "split": "train", "num_tokens": 5},
            {"source": "docs", "record_id": "a.jsonl:2", "format": "chat", "text": "",
             "messages": json.dumps([{"role": "user", "content": "Returns?"},
                                     {"role": "assistant", "content": "Within thirty days."}]),
             "split": "train", "num_tokens": 5},
            {"source": "docs", "record_id": "a.jsonl:3", "format": "completion", "text": "The held-out answer.",
             "messages": "", "split": "val", "num_tokens": 4}]
    pq.write_table(pa.Table.from_pylist(rows), split / "part-0.parquet")
    return str(records)


def test_chunks_from_a_data_run_and_files_keep_their_ids(tmp_path):
    handbook = tmp_path / "handbook.md"
    handbook.write_text("# Shipping\n\nWidgets leave the warehouse daily.\n\n\nOk.\n")
    g = config.GroundedQaConfig(data_run=_data_run(tmp_path), files=[str(handbook)], min_chunk_chars=5)
    chunks = generators.read_chunks(g)
    assert {c["id"]: c["text"] for c in chunks} == {
        "docs/a.jsonl:1": "Widgets ship in two days.",
        "docs/a.jsonl:2": "Returns?\n\nWithin thirty days.",
        f"{handbook}#0": "# Shipping",
        f"{handbook}#1": "Widgets leave the warehouse daily.",
    }  # the val record is not a chunk; "Ok." is under min_chunk_chars
    assert len(generators.read_chunks(g.model_copy(update={"max_chunks": 2}))) == 2


def test_evaluation_texts_are_the_val_split_and_the_decontaminate_files(tmp_path):
    extra = tmp_path / "eval.jsonl"
    extra.write_text(json.dumps({"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]})
                     + "\nplain line\n")
    cfg = config.load_dict({"version": 1, "output_dir": str(tmp_path / "out"),
                            "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
                            "model": {"name_or_path": "preset:tiny-llama"},
                            "synth": {"grounded_qa": {"data_run": _data_run(tmp_path)}, "decontaminate": [str(extra)]}})
    assert generators.eval_texts(cfg) == ["Q1\nA1", "plain line", "The held-out answer."]


def test_self_instruct_prompts_show_six_seeds_and_two_generated_tasks(tmp_path):
    seeds = [f"Seed task {i}." for i in range(10)]
    si = config.SelfInstructConfig(seeds=seeds)
    rng = random.Random(0)
    first = generators.instruction_prompt(si, seeds, [], rng)[0]["content"]
    assert sum(f"Seed task {i}." in first for i in range(10)) == 8  # seeds fill in while none is generated
    made = ["Made task A.", "Made task B.", "Made task C."]
    later = generators.instruction_prompt(si, seeds, made, rng)[0]["content"]
    assert sum(f"Seed task {i}." in later for i in range(10)) == 6
    assert sum(m in later for m in made) == 2
    assert "1. " in later and "8. " in later and "9. " not in later


def test_seed_file_jsonl_or_lines(tmp_path):
    f = tmp_path / "seeds.jsonl"
    f.write_text('{"instruction": "Name a colour.", "output": "Red"}\n{"instruction": "Add 2 and 3."}\n')
    assert generators.read_seeds(config.SelfInstructConfig(seeds=["Inline."], seed_file=str(f))) == [
        "Inline.", "Name a colour.", "Add 2 and 3."]
    t = tmp_path / "seeds.txt"
    t.write_text("Name a colour.\n\nAdd 2 and 3.\n")
    assert generators.read_seeds(config.SelfInstructConfig(seed_file=str(t))) == ["Name a colour.", "Add 2 and 3."]


def test_the_shipped_acme_config_asks_raylabs_own_endpoint_about_the_handbook(monkeypatch):
    """configs/synth-acme.yaml (`raylab validate` runs on it in tests/unit/config/test_shipped.py):
    its chunks are the handbook's paragraphs, its endpoint raylab's served production version."""
    from conftest import REPO
    from raylab.synth import client

    monkeypatch.chdir(REPO)
    cfg = config.load(REPO / "configs" / "synth-acme.yaml")
    chunks = generators.read_chunks(cfg.synth.grounded_qa)
    assert len(chunks) >= 16 and all(c["id"].startswith("examples/acme/handbook/") for c in chunks)
    assert not any(c["text"].startswith("#") for c in chunks)  # headings are below min_chunk_chars
    ep, own = client.resolve_endpoint(cfg)
    assert own and (ep.base_url, ep.model) == ("http://127.0.0.1:8000/v1", "acme-assistant@production")
    client.check_policy(cfg)  # loopback: no governance.allow_remote needed
    assert generators.eval_texts(cfg)  # the held-out questions are decontaminated against


def test_a_file_that_is_not_utf8_is_a_user_error_naming_it(tmp_path):
    legacy = tmp_path / "legacy.md"
    legacy.write_bytes("Caf\u00e9 opening hours: see the canteen page for the times of every weekday.".encode("latin-1"))
    with pytest.raises(UserError, match=r"synth.grounded_qa.files: .*legacy.md is not UTF-8"):
        generators.read_chunks(config.GroundedQaConfig(files=[str(legacy)]))
    legacy.write_text(legacy.read_bytes().decode("latin-1"))  # control: the same text as UTF-8 reads
    assert len(generators.read_chunks(config.GroundedQaConfig(files=[str(legacy)], min_chunk_chars=10))) == 1


def test_grounded_qa_reads_only_the_chunks_its_org_may_read_from_an_index(tmp_path):
    """The serving search's rule (rag.store.access_filter): chunks without an org, the org's own,
    and those whose ACL names it; org none reads only chunks without an org."""
    pytest.importorskip("lancedb")
    import numpy as np
    from rag_index import write_index

    texts = ["Public: the canteen opens at eight.", "Acme: badges are renewed in March.",
             "Globex: the rocket lab is in building nine.", "Globex, shared with Acme: payday is the 25th."]
    write_index(tmp_path / "ix", texts, orgs=[None, "acme", "globex", "globex"], acls=[[], [], [], ["acme"]],
                vectors=np.eye(4, 384, dtype=np.float32))  # reading chunks embeds nothing

    def ids(org):
        g = config.GroundedQaConfig(index=str(tmp_path / "ix"), org=org, min_chunk_chars=0)
        return [c["id"] for c in generators.read_chunks(g)]

    assert ids("acme") == ["c0", "c1", "c3"]  # never c2, globex's own
    assert ids("globex") == ["c0", "c2", "c3"], "the control: c2 is in the index, and another org reads it"
    assert ids(None) == ["c0"]
    from raylab.rag import index_chunks

    assert len(index_chunks(str(tmp_path / "ix"), "globex")) == 3


def test_grounded_qa_reads_only_the_data_run_records_of_sources_its_org_may_read(tmp_path):
    run = _data_run(tmp_path, [{"type": "jsonl", "path": "a.jsonl", "name": "docs", "org": "globex"}])

    def texts(org):
        g = config.GroundedQaConfig(data_run=run, org=org, min_chunk_chars=0)
        return [c["text"] for c in generators.read_chunks(g)]

    assert texts("acme") == [] and texts(None) == []
    assert len(texts("globex")) == 2, "the control: the same records, read by their own org"
    (tmp_path / "run" / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {"sources": [
        {"type": "jsonl", "path": "a.jsonl", "name": "docs", "org": "globex", "acl": ["acme"]}]}}))
    assert len(texts("acme")) == 2  # an ACL naming acme
    (tmp_path / "run" / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {"sources": [
        {"type": "jsonl", "path": "a.jsonl", "name": "other"}]}}))
    assert texts(None) == [], "a source the run's config does not name has an unknown org: not read"
    (tmp_path / "run" / "config.resolved.yaml").unlink()
    with pytest.raises(UserError, match="synth.grounded_qa.data_run: .*config.resolved.yaml is missing"):
        texts("globex")
