"""RAFT's selection rules on plain rows (the index-backed run is in tests/integration/test_rag.py)."""

from __future__ import annotations

import json

import pytest

from raylab import config
from raylab.cli import main
from raylab.errors import UserError
from raylab.rag import prompt, raft


def chunk(i: int, record: str, text: str = "", score: float = 0.5) -> dict:
    return {"chunk_id": f"c{i}", "record_id": record, "origin": f"doc:{record}", "source": "s",
            "text": text or f"chunk {i} of {record}.", "score": score}


def items(n: int, k: int = 3) -> list[dict]:
    return [{"question": f"q{i}?", "answer": f"answer {i}", "oracle": chunk(100 + i, f"r{i}", f"The answer {i} is here."),
             "distractors": [chunk(10 * i + j, f"other{j}") for j in range(k + 2)]} for i in range(n)]


@pytest.mark.parametrize("n, p, expect", [(10, 0.8, 8), (8, 0.75, 6), (5, 0.0, 0), (5, 1.0, 5), (3, 0.5, 2)])
def test_exactly_round_p_n_examples_keep_the_oracle(n, p, expect):
    examples = raft.assemble(items(n), k=3, p=p, seed=1)
    assert sum(e["oracle_in_context"] for e in examples) == expect
    for e, item in zip(examples, items(n), strict=True):
        user = e["messages"][0]["content"]
        assert len(e["distractor_chunk_ids"]) == 3  # k of the k + 2 offered, in every example
        assert (item["oracle"]["text"] in user) == e["oracle_in_context"]
        assert user.count("\n[") == 3 + e["oracle_in_context"]  # numbered documents
        assert e["messages"][1]["content"] == f"{prompt.QUOTE_OPEN}The answer {item['answer'][-1]} is here." \
                                              f"{prompt.QUOTE_CLOSE}\n{item['answer']}"


def test_the_seed_decides_and_repeats():
    first, again = raft.assemble(items(12), 3, 0.5, seed=3), raft.assemble(items(12), 3, 0.5, seed=3)
    assert first == again
    others = [raft.assemble(items(12), 3, 0.5, seed=s) for s in range(4, 8)]
    assert any([e["oracle_in_context"] for e in o] != [e["oracle_in_context"] for e in first] for o in others)


def test_the_oracle_holds_the_answer_not_merely_the_nearest_chunk():
    answer = "Refunds are paid within 14 days of the return."
    nearest = chunk(1, "a", "Returns are accepted for 30 days.", score=0.9)
    holder = chunk(2, "b", "Shipping is free. Refunds are paid within 14 days of the return. Ask us.", score=0.6)
    assert raft.choose_oracle([nearest, holder], answer)["chunk_id"] == "c2"
    assert raft.choose_oracle([nearest], answer) is None  # under half of the answer's words: unsupported
    assert raft.supporting_sentence(holder["text"], answer) == "Refunds are paid within 14 days of the return."


def test_distractors_skip_the_oracle_and_its_document():
    oracle = chunk(1, "doc1")
    candidates = [oracle, chunk(2, "doc1"), chunk(3, "doc2"), chunk(4, "doc3"), chunk(5, "doc4")]
    assert [c["chunk_id"] for c in raft.distractors_for(candidates, oracle, 2)] == ["c3", "c4"]


def test_bad_question_files_name_file_and_line(tmp_path):
    f = tmp_path / "qa.jsonl"
    with pytest.raises(UserError, match="does not exist"):
        raft.read_pairs(str(f))
    f.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n" + json.dumps({"question": "q2?"}) + "\n")
    with pytest.raises(UserError, match=r"qa\.jsonl:2 needs non-empty string fields 'question' and 'answer'"):
        raft.read_pairs(str(f))
    f.write_text("{not json\n")
    with pytest.raises(UserError, match=r"qa\.jsonl:1 is not JSON"):
        raft.read_pairs(str(f))


def test_config_needs_more_candidates_than_distractors():
    raw = {"version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "data": {"sources": [{"type": "jsonl", "path": "x"}]},
           "index": {"raft": {"questions": "qa.jsonl", "distractors": 4, "candidates": 4}}}
    with pytest.raises(config.ConfigError, match=r"index\.raft\.candidates"):
        config.load_dict(raw)
    raw["index"]["raft"]["candidates"] = 5
    assert config.load_dict(raw).index.raft.oracle_fraction == 0.8


def test_cli_raft_without_its_section_is_exit_2_before_indexing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"version": 1, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "preset:tiny-llama"},
                               "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "d.jsonl")}]}}))
    assert main(["index", str(cfg), "--raft", str(tmp_path / "out.jsonl")]) == 2
    assert "index.raft" in capsys.readouterr().err and not (tmp_path / "run").exists()
