"""`raylab eval --rag`'s metrics on plain lists, its config, its bad input (exit 2) and the
retrieval gates (the index-backed run is in tests/integration/test_rag.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raylab import config
from raylab.cli import main
from raylab.core import runs
from raylab.evaluate import describe, rag_checks
from raylab.rag import evaluate, raft

A, B, C = {"c1", "r1", "doc/a.md"}, {"c2", "r2", "doc/b.md"}, {"c3", "r3", "doc/c.md"}


def test_recall_counts_relevant_keys_found_in_the_first_k():
    assert evaluate.recall_at_k([A, B, C], {"doc/b.md"}, k=2) == 1.0
    assert evaluate.recall_at_k([A, B, C], {"doc/c.md"}, k=2) == 0.0  # third: outside k
    assert evaluate.recall_at_k([A, B, C], {"doc/c.md"}, k=3) == 1.0
    assert evaluate.recall_at_k([A, B], {"r1", "doc/z.md"}, k=5) == 0.5  # one of two relevant items
    assert evaluate.recall_at_k([], {"r1"}, k=5) == 0.0
    with pytest.raises(ValueError):
        evaluate.recall_at_k([A], set(), k=1)


def test_reciprocal_rank_of_the_first_match():
    assert evaluate.reciprocal_rank([A, B, C], {"c1"}, k=3) == 1.0
    assert evaluate.reciprocal_rank([A, B, C], {"r3", "doc/b.md"}, k=3) == 0.5  # B comes first
    assert evaluate.reciprocal_rank([A, B, C], {"c3"}, k=3) == pytest.approx(1 / 3)
    assert evaluate.reciprocal_rank([A, B, C], {"c3"}, k=2) == 0.0
    assert evaluate.reciprocal_rank([A, B, C], {"nowhere"}, k=3) == 0.0


def test_chunk_keys_are_chunk_id_record_id_and_origin():
    hit = {"chunk_id": "c9", "record_id": "r9", "origin": "s3://b/k.txt", "text": "t", "score": 0.3}
    assert evaluate.chunk_keys(hit) == {"c9", "r9", "s3://b/k.txt"}


CHUNKS = ["Refunds are paid within 14 days of the return. Shipping is free on orders over 50 euros.",
          "Our offices in Lyon open at nine on weekdays."]


def test_faithfulness_counts_supported_sentences():
    assert evaluate.faithfulness("Refunds are paid within 14 days of the return. Offices in Lyon open at nine.",
                                 CHUNKS, 0.5) == (2, 2)
    made_up = "Zebrafish accountants reconcile lighthouse ledgers. Purple tugboats audit glaciers."
    assert evaluate.faithfulness(made_up, CHUNKS, 0.5) == (0, 2)
    mixed = "Shipping is free on orders over 50 euros. Zebrafish audit the tugboats."
    assert evaluate.faithfulness(mixed, CHUNKS, 0.5) == (1, 2)


def test_stop_words_support_nothing_and_the_threshold_decides():
    # shares only function words with the chunks: all words counted, 3 of its 5 are held
    function_words = "It is on the zebras."
    assert raft.support(CHUNKS[0], function_words) == 0.6
    assert evaluate.faithfulness(function_words, CHUNKS, 0.5) == (0, 1)
    assert evaluate.faithfulness("It is that we are in.", CHUNKS, 0.5) == (0, 0)  # no content word: no claim
    half = "Refunds arrive by pigeon."  # content words: refunds, arrive, pigeon -> 1/3 held
    assert evaluate.faithfulness(half, CHUNKS, 0.3) == (1, 1)
    assert evaluate.faithfulness(half, CHUNKS, 0.5) == (0, 1)
    assert evaluate.faithfulness("Yes.", CHUNKS, 0.5) == (0, 0)  # no claim, not counted


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 7, 23))])
@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_matches_numpy(values, q):
    assert evaluate.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        evaluate.percentile([], 50)


def _raw(tmp_path, **eval_) -> dict:
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    index = {"eval": eval_} if eval_ else {}
    return {"version": 1, "output_dir": str(tmp_path / "run"), "data": {"sources": [{"type": "jsonl", "path": str(corpus)}]},
            "model": {"name_or_path": "preset:tiny-llama"}, "index": index}


def test_config_defaults_and_keys_named(tmp_path):
    ev = config.load_dict(_raw(tmp_path, questions="qa.jsonl")).index.eval
    assert (ev.k, ev.min_overlap) == (5, 0.5) and ev.questions.endswith("qa.jsonl")
    assert config.load_dict(_raw(tmp_path)).index.eval is None
    for bad, key in (({"questions": "q", "top_k": 3}, "index.eval.top_k"), ({"questions": "q", "k": 0}, "index.eval.k"),
                     ({"questions": "q", "min_overlap": 0}, "index.eval.min_overlap"), ({"k": 3}, "index.eval.questions")):
        with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
            config.load_dict(_raw(tmp_path, **bad))
    raw = _raw(tmp_path)
    raw["registry"] = {"gates": {"min_recall_at_k": 1.5}}
    with pytest.raises(config.ConfigError, match=r"registry\.gates\.min_recall_at_k"):
        config.load_dict(raw)


def _cli(tmp_path, capsys, raw, *flags) -> tuple[int, str]:
    cfg_file = tmp_path / "rag.yaml"
    cfg_file.write_text(json.dumps(raw))
    code = main(["eval", str(cfg_file), "--rag", *flags])
    return code, capsys.readouterr().err


def test_bad_input_is_exit_2_naming_what_to_fix(tmp_path, capsys):
    code, err = _cli(tmp_path, capsys, _raw(tmp_path))
    assert code == 2 and "--rag needs an index.eval section" in err
    questions = tmp_path / "qa.jsonl"
    code, err = _cli(tmp_path, capsys, _raw(tmp_path, questions=str(questions)))
    assert code == 2 and "index.eval.questions" in err and "does not exist" in err
    questions.write_text(json.dumps({"question": "q?", "relevant": ["a"]}) + "\n{not json\n")
    code, err = _cli(tmp_path, capsys, _raw(tmp_path, questions=str(questions)))
    assert code == 2 and f"{questions}:2 is not JSON" in err
    questions.write_text(json.dumps({"question": "q?", "relevant": []}) + "\n")
    code, err = _cli(tmp_path, capsys, _raw(tmp_path, questions=str(questions)))
    assert code == 2 and f"{questions}:1 needs 'relevant'" in err
    code, err = _cli(tmp_path, capsys, _raw(tmp_path, questions=str(questions)), "--model", "m/1")
    assert code == 2 and "--model" in err
    assert not (tmp_path / "run" / "eval").exists(), "nothing is written for bad input"


def test_a_missing_index_is_exit_2_naming_it(tmp_path, capsys):
    questions = tmp_path / "qa.jsonl"
    questions.write_text(json.dumps({"question": "q?", "relevant": ["a"], "answer": "a."}) + "\n")
    code, err = _cli(tmp_path, capsys, _raw(tmp_path, questions=str(questions)))
    assert code == 2 and str(tmp_path / "run" / "index") in err and "raylab index" in err


def _report(output_dir, recall: float, mrr: float) -> None:
    runs.write_json(runs.Run(str(output_dir)).eval_file("rag"), runs.RagEvalReport(
        created="2026-01-01T00:00:00+00:00", index="idx", model="m", questions="qa.jsonl", k=5, count=10,
        recall_at_k=recall, mrr=mrr, faithfulness=None, answers=0, answer_sentences=0, supported_sentences=0,
        min_overlap=0.5, latency_ms={"p50": 1.0, "p95": 2.0}, per_question=[]))


def test_gates_read_the_report_and_fail_without_one(tmp_path):
    gates = config.GatesConfig(min_recall_at_k=0.8, min_mrr=0.5)
    assert rag_checks(config.GatesConfig(), str(tmp_path)) == []  # no gate set: nothing to check
    missing = rag_checks(gates, str(tmp_path))
    assert [c["passed"] for c in missing] == [False, False]
    assert all("raylab eval CONFIG --rag" in c["message"] for c in missing) and "run `raylab eval" in describe(missing[0])
    _report(tmp_path, recall=0.9, mrr=0.6)
    assert [c["passed"] for c in rag_checks(gates, str(tmp_path))] == [True, True]
    _report(tmp_path, recall=0.7, mrr=0.6)
    checks = rag_checks(gates, str(tmp_path))
    assert [c["passed"] for c in checks] == [False, True]
    assert "recall@5 0.7000 is under 0.8000" in checks[0]["message"] and "0.6000 >= 0.5000" in describe(checks[1])
