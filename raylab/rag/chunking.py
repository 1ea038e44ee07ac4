"""Documents -> chunks measured in the embedder's own tokens.

    windows = token_windows(word_ids, size=200, overlap=32)    # [(first token, end token), ...]
    chunks = chunk_document(text, tokenizer, 200, 32)         # [(start char, end char, text), ...]
    chunk_batch(docs_batch, tokenizer_path, 200, 32)          # a Ray Data batch of chunk rows

Counting in the embedder's tokens is what keeps a chunk whole: a sentence encoder truncates
silently past its max_seq_length (MiniLM: 256 word-pieces with [CLS] and [SEP]), so a chunk
sized in characters or another tokenizer's tokens could lose its tail unnoticed. Windows end
and start on word boundaries, so a chunk's text tokenizes to exactly its window's tokens
again when the embedder reads it (a word-piece cut in half would re-tokenize differently).

A chunk's id hashes its source, its document's origin, its character span and its text: the
same chunk of the same document gets the same id on every run, and any change gives a new
one. `content_hash` hashes the text alone: an index re-run copies the vector of a chunk whose
text it has embedded before, whatever moved around it.
"""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa

CHUNK_SCHEMA = pa.schema([
    ("chunk_id", pa.string()), ("content_hash", pa.string()), ("source", pa.string()), ("origin", pa.string()),
    ("record_id", pa.string()), ("start", pa.int64()), ("end", pa.int64()), ("text", pa.string()),
    ("org", pa.string()), ("acl", pa.list_(pa.string())),  # who may retrieve it (store.access_filter)
])


def token_windows(word_ids: list[int | None], size: int, overlap: int) -> list[tuple[int, int]]:
    """Token index ranges [i, j) of at most `size` tokens, each starting `overlap` tokens or a
    little more (back to a word start) before the previous one ends; boundaries fall between
    words unless one word alone is longer than a window."""
    n = len(word_ids)
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        j = min(i + size, n)
        if j < n:
            k = _word_start_at_or_before(word_ids, j, floor=i + 1)
            j = k if k is not None else j
        out.append((i, j))
        if j >= n:
            break
        nxt = max(j - overlap, i + 1)
        k = _word_start_at_or_before(word_ids, nxt, floor=i + 1)
        i = k if k is not None else nxt
    return out


def _word_start_at_or_before(word_ids: list[int | None], k: int, floor: int) -> int | None:
    """The largest index in [floor, k] where a new word begins, or None."""
    while k >= floor:
        if word_ids[k] is None or word_ids[k] != word_ids[k - 1]:
            return k
        k -= 1
    return None


def _encode(tokenizer, text: str) -> tuple[list[tuple[int, int]], list[int | None]]:
    """(character offsets, word ids) of text's tokens, without special tokens."""
    if hasattr(tokenizer, "no_truncation"):  # a `tokenizers.Tokenizer`
        enc = tokenizer.encode(text, add_special_tokens=False)
        return enc.offsets, enc.word_ids
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return enc["offset_mapping"], enc.word_ids()


def chunk_document(text: str, tokenizer, size: int, overlap: int) -> list[tuple[int, int, str]]:
    """(start, end, text[start:end]) for each chunk of `text`, in order."""
    offsets, word_ids = _encode(tokenizer, text)
    if not offsets:
        return []
    out = []
    for i, j in token_windows(word_ids, size, overlap):
        start, end = offsets[i][0], offsets[j - 1][1]
        out.append((start, end, text[start:end]))
    return out


def chunk_id(source: str, origin: str, start: int, end: int, text: str, org: str | None = None,
             acl: list[str] | tuple[str, ...] = ()) -> str:
    parts = [source, origin, f"{start}:{end}", text]
    if org is not None or acl:
        # access is part of the id: a source moved to another org (or ACL) gives new ids, so a
        # re-index replaces its rows instead of keeping them, readable by the old org, as
        # unchanged; the content hash stays text-only, so their vectors are copied, not re-embedded
        parts += ["org=" + (org or ""), "acl=" + ",".join(sorted(acl))]
    material = "\x1f".join(parts)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:32]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


_TOKENIZERS: dict[str, object] = {}


def tokenizer_for(path: str):
    """The embedder's tokenizer, loaded once per worker process (a chunking task reuses the
    one an earlier task on the same worker loaded). A local model's tokenizer.json is read
    with `tokenizers` alone: importing transformers (and torch) in every Ray worker that
    chunks would cost seconds each; a hub id goes through AutoTokenizer."""
    if path not in _TOKENIZERS:
        local = os.path.join(path, "tokenizer.json")
        if os.path.isfile(local):
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(local)
            tok.no_truncation()  # sentence-transformers' files often truncate at 128: chunk whole texts
            tok.no_padding()
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
        _TOKENIZERS[path] = tok
    return _TOKENIZERS[path]


def chunk_batch(batch: pa.Table, tokenizer_path: str, size: int, overlap: int) -> pa.Table:
    """Documents (source, record_id, origin, body; optional org, acl) -> chunk rows
    (CHUNK_SCHEMA); a chunk carries its document's org and ACL."""
    tok = tokenizer_for(tokenizer_path)
    rows = []
    columns = ["source", "record_id", "origin", "body"] + [c for c in ("org", "acl") if c in batch.column_names]
    for doc in batch.select(columns).to_pylist():
        org, acl = doc.get("org"), doc.get("acl") or []
        for start, end, text in chunk_document(doc["body"], tok, size, overlap):
            rows.append({"chunk_id": chunk_id(doc["source"], doc["origin"], start, end, text, org, acl),
                         "content_hash": content_hash(text), "source": doc["source"], "origin": doc["origin"],
                         "record_id": doc["record_id"], "start": start, "end": end, "text": text, "org": org,
                         "acl": acl})
    return pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)
