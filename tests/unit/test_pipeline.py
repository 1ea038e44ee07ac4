"""`raylab run`'s argument errors and the Python API's config handling. The pipeline itself
runs end to end in tests/test_jobs.py (the cut-down quickstart as a Ray job on a two-node
cluster: data, train, gates, promote, serve, smoke requests, summary) and in full from
`make quickstart`."""

from __future__ import annotations

import pytest

from conftest import REPO, cli_here


def test_raylab_run_cli_arguments():
    bad = cli_here("run", "configs/quickstart.yaml", "--until", "deploy")  # in process: usage errors, no Ray
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = cli_here("run")
    assert missing.returncode == 2 and "CONFIG file is required" in missing.stderr


def test_python_api_mirrors_the_cli():
    import raylab

    cfg = raylab._config(REPO / "configs" / "quickstart.yaml", ["train.max_steps=3"])
    assert cfg.train.max_steps == 3 and cfg.registry.model_name == "acme-assistant"
    assert raylab._config(cfg.model_dump(mode="json"), ["train.lr=1e-4"]).train.lr == 1e-4
    for name in ("run", "run_data", "run_train", "run_tune", "run_eval", "start_serving", "stop_serving"):
        assert callable(getattr(raylab, name)) and name in raylab.__all__
    # The stage modules import without shadowing the API functions.
    from raylab import data, pipeline, train, tune  # noqa: F401

    assert callable(raylab.run) and raylab.run is not pipeline


def test_a_run_that_would_serve_checks_the_api_keys_before_any_stage(tmp_path, capsys):
    from raylab import cli

    keys = tmp_path / "keys.txt"
    keys.write_text("\n# no key yet\n")
    proc_args = ["run", str(REPO / "configs" / "quickstart.yaml"), f"serve.api_keys_file={keys}",
                 f"output_dir={tmp_path / 'run'}"]
    assert cli.main(proc_args) == 2  # before Ray starts or the data stage reads anything
    err = capsys.readouterr().err
    assert f"raylab run: error: serve.api_keys_file: {keys} has no API key" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_run_that_would_serve_checks_eval_held_out_before_any_stage(tmp_path, capsys):
    from raylab import cli

    bad = tmp_path / "held.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "When?"}], "reference": "Today."}\nnot json\n')
    args = ["run", str(REPO / "configs" / "quickstart.yaml"), f"output_dir={tmp_path / 'run'}"]
    assert cli.main([*args, f"eval.held_out={bad}"]) == 2
    assert f"eval.held_out {bad}: line 2: not JSON" in capsys.readouterr().err
    assert cli.main([*args, f"eval.held_out={tmp_path / 'none.jsonl'}"]) == 2
    assert f"eval.held_out {tmp_path / 'none.jsonl'}: file not found" in capsys.readouterr().err


def _corpus_questions() -> set[str]:
    import csv
    import json

    acme = REPO / "examples" / "acme"
    with (acme / "faq.csv").open(encoding="utf-8") as f:
        asked = {row[0] for row in csv.reader(f) if row}
    for line in (acme / "support_chats.jsonl").read_bytes().splitlines():
        try:
            asked |= {m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"}
        except (ValueError, KeyError, TypeError):  # the corpus's deliberately broken lines
            continue
    return asked


def test_the_quickstart_headline_is_a_held_out_paraphrase_in_no_training_record():
    from raylab import config, pipeline
    from raylab.evaluate.batch import normalize

    cfg = config.load(REPO / "configs" / "quickstart.yaml")
    qs = pipeline.questions(cfg)
    assert len(qs) == 30 and all(q["kind"] == "held_out" and q["reference"] for q in qs)
    assert qs[0]["messages"] == [{"role": "user", "content": "How many days off do I get each year?"}]
    assert qs[0]["reference"] == "Every Acme employee gets 27 vacation days per year."
    asked = _corpus_questions()
    assert len(asked) > 100  # the check below reads the corpus's real questions (not vacuous)
    corpus_text = " ".join(normalize(q) for q in asked)
    for q in qs:
        question = normalize(q["messages"][-1]["content"])
        assert question not in corpus_text, question  # not asked anywhere in the corpus, not even inside a chat turn
    # the references are the corpus's own facts
    handbook = " ".join(p.read_text(encoding="utf-8", errors="replace") for p in (REPO / "examples/acme/handbook").glob("*.md"))
    assert all(q["reference"] in handbook for q in qs)


def test_held_out_rouge_l_scores_only_held_out_answers():
    from raylab import pipeline

    answers = [{"kind": "held_out", "reference": "Every Acme employee gets 27 vacation days per year.",
                "answer": "Every Acme employee gets 27 vacation days per year.", "base_answer": "Travel expenses are approved."},
               {"kind": "held_out", "reference": "The canteen serves lunch.", "answer": "The canteen is closed.",
                "base_answer": ""},
               {"kind": "seen", "reference": "x y", "answer": "nothing alike", "base_answer": "nothing alike"}]
    r = pipeline.rouge(answers)
    assert r["questions"] == 2 and r["base"] == 0.0
    assert r["tuned"] == round((1.0 + 0.5) / 2, 3)  # "the canteen" of 4 words each: LCS 2 -> F1 0.5
    assert pipeline.rouge(answers[2:]) is None


def test_the_summary_heads_with_the_held_out_answer_and_labels_the_seen_one(caplog):
    import logging

    from raylab import pipeline

    smoke = [{"kind": "held_out", "question": "How many days off do I get each year?", "answer": "27 days.",
              "base_answer": "Acme", "reference": "Every Acme employee gets 27 vacation days per year."},
             {"kind": "held_out", "question": "Second?", "answer": "b", "base_answer": "a", "reference": "c"},
             {"kind": "seen", "question": "How much annual leave do I have?", "answer": "27 days.", "base_answer": "x",
              "reference": "Every Acme employee gets 27 vacation days per year."}]
    summary = {"stages": {"data": 1.0}, "smoke": smoke, "held_out_rouge_l": pipeline.rouge(smoke)}
    with caplog.at_level(logging.INFO, logger="raylab.pipeline"):
        pipeline._print_summary(summary)
    lines = "\n".join(r.getMessage() for r in caplog.records).splitlines()
    assert lines[:2] == ["", "=== summary ==="]
    assert lines[2] == "held out: not in the training data: How many days off do I get each year?"
    assert lines[3:6] == ["  base:  Acme", "  tuned: 27 days.", "  corpus: Every Acme employee gets 27 vacation days per year."]
    assert lines[6] == "recall of seen data: from the training set: How much annual leave do I have?"
    assert "Second?" not in "\n".join(lines)  # one held-out headline; the rest are in run.json
    assert lines[10].startswith("held-out ROUGE-L over 2 question(s): base ") and lines[11].startswith("stages: ")


def test_the_optimize_stage_runs_only_when_a_method_is_set_and_the_run_reaches_it():
    import raylab
    from raylab import pipeline

    cfg = raylab._config(REPO / "configs" / "quickstart.yaml", [])
    assert not pipeline.optimizing(cfg, None)  # no optimize method: the run is what it was
    quantize = raylab._config(cfg.model_dump(mode="json"), ["optimize.quantize=int8_weight_only"])
    assert pipeline.optimizing(quantize, None) and pipeline.optimizing(quantize, "optimize")
    assert pipeline.optimizing(quantize, "serve")
    assert not any(pipeline.optimizing(quantize, u) for u in ("data", "train", "gates", "promote"))
    assert not pipeline.optimizing(raylab._config(quantize.model_dump(mode="json"), ["registry.enabled=false"]), None)
    assert pipeline.STAGES.index("promote") < pipeline.STAGES.index("optimize") < pipeline.STAGES.index("serve")


def test_a_run_whose_optimize_section_cannot_run_here_stops_before_any_stage(tmp_path, capsys):
    import torch

    from raylab import cli

    if torch.cuda.is_available():
        pytest.skip("int4 is refused only without CUDA/XPU")
    args = ["run", str(REPO / "configs" / "quickstart.yaml"), f"output_dir={tmp_path / 'run'}", "--no-serve"]
    assert cli.main([*args, "optimize.quantize=int4_weight_only"]) == 2
    err = capsys.readouterr().err
    assert "optimize.quantize: int4_weight_only needs a CUDA or XPU device" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # before Ray starts or the data stage reads anything


def _rag_reply(answer: str, sources: list[dict]) -> dict:
    """A chat reply in the shape the endpoint returns with serve.rag (docs/retrieval.md)."""
    reply = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
    return reply | ({"raylab": {"sources": sources}} if sources else {})


def test_the_summary_shows_the_retrieval_augmented_answer_with_its_sources(caplog):
    import logging

    from raylab import pipeline

    question = {"messages": [{"role": "user", "content": "How many days off do I get each year?"}],
                "reference": "Every Acme employee gets 27 vacation days per year.", "kind": "held_out"}
    sources = [{"chunk_id": "a1", "source": "handbook", "origin": "examples/acme/handbook/01-hours.md", "record_id": "0",
                "start": 0, "end": 150, "score": 0.61234, "text": "Every Acme employee gets 27 vacation days per year."},
               {"chunk_id": "b2", "source": "handbook", "origin": "examples/acme/handbook/12-sick.md", "record_id": "11",
                "start": 0, "end": 200, "score": 0.4, "text": "Sick leave ..."}]
    entry = pipeline.rag_entry(question, _rag_reply("27 vacation days.", sources))
    assert entry["question"] == "How many days off do I get each year?" and entry["answer"] == "27 vacation days."
    assert [(s["origin"], s["score"]) for s in entry["sources"]] == [
        ("examples/acme/handbook/01-hours.md", 0.612), ("examples/acme/handbook/12-sick.md", 0.4)]
    smoke = [{"kind": "held_out", "question": entry["question"], "answer": "Acme", "base_answer": "x",
              "reference": question["reference"]}]
    with caplog.at_level(logging.INFO, logger="raylab.pipeline"):
        pipeline._print_summary({"stages": {"data": 1.0}, "smoke": smoke, "rag": entry})
    printed = "\n".join(r.getMessage() for r in caplog.records).splitlines()
    at = printed.index("with retrieval (serve.rag): How many days off do I get each year?")
    assert printed[at + 1:at + 5] == ["  answer:  27 vacation days.",
                                      "  corpus:  Every Acme employee gets 27 vacation days per year.",
                                      "  source [1]: examples/acme/handbook/01-hours.md (score 0.612)",
                                      "  source [2]: examples/acme/handbook/12-sick.md (score 0.400)"]
    assert at > printed.index("  tuned: Acme")  # after the headline, which it repeats with retrieval

    # The controls: a run without serve.rag has no "rag" in its summary and prints no such lines;
    # a reply without sources says so instead of printing an empty list.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raylab.pipeline"):
        pipeline._print_summary({"stages": {"data": 1.0}, "smoke": smoke})
    assert caplog.records and not any("retrieval" in r.getMessage() or "source [" in r.getMessage()
                                      for r in caplog.records)
    bare = pipeline.rag_entry(question, _rag_reply("27.", []))
    assert bare["sources"] == [] and pipeline.rag_lines(bare)[-1] == "  sources: none (the index returned no chunk)"


def test_the_index_stage_runs_only_when_serve_rag_reads_this_configs_index():
    import raylab
    from raylab import pipeline

    cfg = raylab._config(REPO / "configs" / "quickstart.yaml", [])
    assert cfg.index.sources and cfg.serve.rag is not None  # the quickstart retrieves from the handbook
    assert pipeline.indexing(cfg, None) and pipeline.indexing(cfg, "index") and pipeline.indexing(cfg, "serve")
    assert not any(pipeline.indexing(cfg, u) for u in ("data", "pretrain", "train", "tune", "gates", "promote", "optimize"))
    # the controls: no serve.rag, no index stage; serve.rag reading an index built elsewhere
    # (not this config's to build), neither
    assert not pipeline.indexing(raylab._config(cfg.model_dump(mode="json"), ["serve.rag=null"]), None)
    elsewhere = raylab._config(cfg.model_dump(mode="json"), ["serve.rag.index=/srv/indexes/handbook"])
    assert not pipeline.indexing(elsewhere, None)
    same = raylab._config(cfg.model_dump(mode="json"), [f"serve.rag.index={cfg.output_dir}/index"])
    assert pipeline.indexing(same, None)
    assert pipeline.STAGES.index("optimize") < pipeline.STAGES.index("index") < pipeline.STAGES.index("serve")


def test_the_summary_shows_the_explained_answer_with_its_top_input_tokens(caplog):
    import logging

    pytest.importorskip("captum")
    from raylab import models, pipeline
    from raylab.config import ExplainConfig, GlobalExplanationConfig
    from raylab.explain import explain_sample

    tok = models.build_byte_tokenizer()
    model = models.build_tiny_model("tiny-llama", tok, seed=0).eval()
    question = "How many days off do I get each year?"
    item = {"id": "headline", "messages": [{"role": "user", "content": question}], "reference": "27 days."}
    record = explain_sample(model, tok, [item], GlobalExplanationConfig(target="reference"), ExplainConfig())["records"][0]
    entry = {"question": question} | record | {"model": "widgets/3", "method": "feature_ablation", "seconds": 0.4}
    smoke = [{"kind": "held_out", "question": question, "answer": "27 days.", "base_answer": "x", "reference": "27 days."}]
    with caplog.at_level(logging.INFO, logger="raylab.pipeline"):
        pipeline._print_summary({"stages": {"data": 1.0}, "smoke": smoke, "explained": entry,
                                 "held_out_rouge_l": pipeline.rouge(smoke)})
    printed = "\n".join(r.getMessage() for r in caplog.records).splitlines()
    at = printed.index(f"explained (feature_ablation, widgets/3, 0.4 s): {question}")
    assert printed[at + 1] == "  answer:  '27 days.'"  # quoted: the exact text explained, newlines shown
    top = record["top_tokens"][0]
    assert printed[at + 2].startswith(f"  top input tokens: {top['token']!r} ({top['part']}) {top['share']:.2f}, ")
    assert printed[at + 2].count(") 0.") == 5  # five tokens, each with its part and share
    assert printed[at + 3].startswith("  by prompt part: question ") and "system" not in printed[at + 3]  # no system message
    assert printed[at + 4].startswith("held-out ROUGE-L")
    # the controls: without the explain extra one line says so; a run with no explanation prints none
    skipped = {"question": question, "skipped": "raylab explain needs captum, which is not installed"}
    assert pipeline.explained_lines(skipped) == [f"explained: {question}: skipped (raylab explain needs captum, "
                                                 "which is not installed)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raylab.pipeline"):
        pipeline._print_summary({"stages": {"data": 1.0}, "smoke": smoke})
    assert caplog.records and not any("explained" in r.getMessage() for r in caplog.records)
