"""Sequence-level distillation's pieces on tiny objects, no Ray (the whole run, teacher answers
through Ray Data and the student's data stage and training: tests/integration/test_eval.py):
the level chosen by the tokenizers (and logits with another tokenizer refused, naming the
key); the data stage's records as prompts; the teacher's answers as the student's corpus;
the student's own data and train configs; the gates' refusal to score a per-token loss over
another tokenizer's ids, with the same tokenizer as the negative control."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylab import config, evaluate, models
from raylab.config import Fields
from raylab.core import runs
from raylab.errors import ConfigError, UserError
from raylab.evaluate import gates
from raylab.optimize import distill, sequence

TEXTS = ["the red widget ships today", "a blue one ships next week", "green widgets are out of stock again"] * 20


@pytest.fixture(scope="module")
def toks():
    return models.build_byte_tokenizer(), models.train_corpus_tokenizer(TEXTS, vocab_size=300, min_frequency=1)


def raw(tmp_path, **distill_section) -> dict:
    return {"version": 1, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "preset:tiny-llama"},
            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl"), "name": "tickets"},
                                 {"type": "jsonl", "path": str(tmp_path / "y.jsonl"), "name": "tickets-val"}],
                     "fields": {"text": "body", "messages": "turns"}, "val_sources": ["tickets-val"],
                     "validation": {"required": ["customer"]}},
            "registry": {"model_name": "widgets"}, "optimize": {"distill": distill_section}}


def test_the_level_follows_the_tokenizers_and_logits_with_another_one_is_refused(tmp_path, toks):
    byte, bpe = toks
    assert distill.choose_level("auto", byte, bpe, "s") == "sequence"
    assert distill.choose_level("auto", byte, models.build_byte_tokenizer(), "s") == "logits"  # the control
    assert distill.choose_level("sequence", byte, models.build_byte_tokenizer(), "s") == "sequence"  # as asked
    with pytest.raises(UserError, match=r"optimize\.distill\.student=s: its tokenizer differs .* set "
                                        r"optimize\.distill\.level: sequence"):
        distill.choose_level("logits", byte, bpe, "s")
    with pytest.raises(ConfigError, match=r"optimize\.distill\.level"):
        config.load_dict(raw(tmp_path, student="s", level="tokens"))
    # a preset or a mapping is built around the teacher's tokenizer; a directory has its own
    assert distill.student_tokenizer("preset:tiny-llama", byte) is byte
    assert distill.student_tokenizer({"num_hidden_layers": 1}, byte) is byte
    bpe.save_pretrained(tmp_path / "student")
    models.build_tiny_model("tiny-llama", bpe, seed=0).save_pretrained(tmp_path / "student")
    own = distill.student_tokenizer(str(tmp_path / "student"), byte)
    assert distill.tokenizer_mismatch(bpe, own) == []
    # a student with its own tokenizer is built, not refused, when sequence-level distillation asks for it
    model, described = distill.build_student(str(tmp_path / "student"), models.build_tiny_model("tiny-llama", byte),
                                             byte, seed=0, student_tok=own)
    assert described == str(tmp_path / "student") and model.config.vocab_size == len(own)


def records_table(path):
    rows = [
        {"record_id": "b", "format": "chat", "text": "", "split": "train", "messages": json.dumps(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ship date?"},
             {"role": "assistant", "content": "Today."}, {"role": "user", "content": "And the blue one?"},
             {"role": "assistant", "content": "Next week."}])},
        {"record_id": "a", "format": "completion", "text": "one two three four five six", "messages": "",
         "split": "train"},
        {"record_id": "c", "format": "completion", "text": "too short", "messages": "", "split": "train"},
        {"record_id": "d", "format": "chat", "text": "", "split": "train",
         "messages": json.dumps([{"role": "assistant", "content": "Hello."}])},  # nothing before the answer
        {"record_id": "e", "format": "instruction", "text": "", "split": "val", "messages": json.dumps(
            [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}])},
    ]
    path.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path / "part-0.parquet")
    return str(path)


def test_the_records_become_prompts_and_the_teachers_answers_the_corpus(tmp_path):
    records = records_table(tmp_path / "records")
    items = evaluate.record_prompts(records, "train", 2, None)
    assert items == [
        {"id": "a", "text": "one two", "reference": "three four five six"},
        {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ship date?"},
                                 {"role": "assistant", "content": "Today."},
                                 {"role": "user", "content": "And the blue one?"}], "reference": "Next week."}]
    assert [i["id"] for i in evaluate.record_prompts(records, "train", 2, 1)] == ["a"]  # by record id, at most `limit`
    assert [i["id"] for i in evaluate.record_prompts(records, "val", 2, None)] == ["e"]
    assert evaluate.record_prompts(records, "train", 6, None)[0]["id"] == "b"  # six words: nothing left to continue

    chats, texts, empty = sequence.teacher_corpus(items + [{"id": "z", "text": "x y", "reference": "z"}],
                                                  ["three 4", "Tomorrow, by noon.", "  "])
    assert texts == [{"text": "one two three 4"}] and empty == 1
    assert chats == [{"messages": [*items[1]["messages"], {"role": "assistant", "content": "Tomorrow, by noon."}]}]
    assert chats[0]["messages"][-2]["content"] == "And the blue one?"  # the teacher answers the last question

    nested = runs.Run(str(tmp_path / "run")).optimize("distill-widgets-1-abc")
    settings = {"level": "sequence", "max_new_tokens": 8}
    assert sequence.written(nested, settings) is None
    sources = sequence.write_corpus(nested, chats, texts, {"settings": settings, "counts": {"prompts": 3}})["sources"]
    assert [s["format"] for s in sources] == ["chat", "completion"]
    assert [json.loads(line) for line in open(sources[1]["path"])] == texts
    assert sequence.written(nested, settings)["sources"] == sources  # a re-run reuses the answers
    assert sequence.written(nested, settings | {"max_new_tokens": 16}) is None  # other settings: asked again


def test_the_students_data_stage_reads_only_the_teachers_corpus_with_its_tokenizer(tmp_path):
    cfg = config.load_dict(raw(tmp_path, student="/models/small", steps=12, lr=2e-3))
    assert cfg.optimize.distill.level == "auto" and cfg.optimize.distill.max_new_tokens == 128  # the defaults
    nested = runs.Run(cfg.output_dir).optimize("distill-widgets-1-abc")
    sources = [{"type": "jsonl", "path": str(tmp_path / "t.jsonl"), "name": "teacher-chat", "format": "chat",
                "fields": {}}]
    data_cfg = sequence.student_config(cfg, nested, sources)
    assert data_cfg.output_dir == nested.root and data_cfg.model.name_or_path == nested.base
    assert [s.name for s in data_cfg.data.sources] == ["teacher-chat"]
    # the user's field names, held-out sources and required fields are about their own sources, not these
    assert data_cfg.data.sources[0].fields == Fields() and cfg.data.fields.text == "body"
    assert data_cfg.data.val_sources == [] and data_cfg.data.validation.required == []
    assert data_cfg.data.max_seq_len == cfg.data.max_seq_len and data_cfg.data.pii == cfg.data.pii
    train_cfg = sequence.student_config(cfg, nested, sources)
    t = train_cfg.train
    assert (t.objective, t.max_steps, t.lr, t.eval_every) == (cfg.train.objective, 12, 2e-3, 6)
    assert train_cfg.data == data_cfg.data and train_cfg.model.method == "full" and not train_cfg.registry.enabled
    assert train_cfg.optimize.distill is None  # the objective is plain cross-entropy on the teacher's answers


def test_the_gates_do_not_score_a_loss_over_another_tokenizers_ids(tmp_path, toks):
    byte, bpe = toks
    for name, tok in (("byte", byte), ("bpe", bpe)):
        tok.save_pretrained(tmp_path / name)
    manifest = SimpleNamespace(tokenizer={"fingerprint": models.fingerprint(byte)["fingerprint"]})
    derived = SimpleNamespace(tags={"raylab.derived_from": "widgets/1"})
    why = gates._foreign_tokenizer(derived, str(tmp_path / "bpe"), manifest)
    assert why.startswith("not measurable: this version's tokenizer is not the one its held-out split was encoded")
    assert gates._foreign_tokenizer(derived, str(tmp_path / "byte"), manifest) is None  # the control: the same one
    # a version trained on the split is not asked (its tokenizer encoded it)
    assert gates._foreign_tokenizer(SimpleNamespace(tags={}), str(tmp_path / "bpe"), manifest) is None
