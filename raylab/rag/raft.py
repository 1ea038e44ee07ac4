"""RAFT training examples from an index (`raylab index CONFIG --raft OUT.jsonl`).

    raylab index configs/quickstart.yaml --raft runs/quickstart/raft.jsonl
    raylab.rag.run_raft(cfg, "raft.jsonl")          # Python; returns the counts

Retrieval-Augmented Fine-Tuning (Zhang et al., 2024) teaches a model to answer from the
documents it is given and to ignore the ones that do not help. From question/answer pairs
(`index.raft.questions`, JSONL of {question, answer[, chunk_id]}) and the built index:

- the oracle is the chunk holding the answer: `chunk_id` when the pair names it, else, among
  the chunks nearest to the answer, the one containing most of the answer's words (a pair
  whose best chunk holds under half of them is skipped and counted: nothing supports it);
- the distractors are the chunks nearest to the question that are neither the oracle nor
  from the oracle's document (another part of it may hold the answer too): hard negatives,
  which teach more than random ones;
- exactly round(p * n) examples, chosen by `seed`, have the oracle in their context
  (`oracle_fraction`, the paper's p = 0.8); every example has `distractors` of them; the
  documents are shuffled, so position says nothing;
- the answer first quotes the oracle's sentence that best supports it (prompt.quoted), then
  gives the pair's answer; it is the same with or without the oracle in the context, which
  is what makes the model keep the knowledge when retrieval misses.

- only chunks a caller of `index.raft.org` may read are oracles or distractors (default none:
  chunks without an org), so one org's examples never carry another org's documents.

The output is an ordinary `chat` JSONL source for the data stage (data.sources:
`{type: jsonl, path: OUT, format: chat}`), in the prompt format serving uses (prompt.py).
Each line also says which chunk was the oracle and which were distractors, for audits.
"""

from __future__ import annotations

import json
import logging
import random
import re

from raylab.config import RaylabConfig
from raylab.core import storage
from raylab.errors import UserError
from raylab.rag import embedder, jsonl, prompt, stores
from raylab.rag.search import open_index
from raylab.rag.stage import index_directory

log = logging.getLogger(__name__)

MIN_SUPPORT = 0.5  # share of the answer's words the oracle chunk must hold
_WORD = re.compile(r"\w+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def support(chunk_text: str, answer: str) -> float:
    """Share of the answer's words that the chunk holds (0 for an answer without words)."""
    want = words(answer)
    return len(want & words(chunk_text)) / len(want) if want else 0.0


def supporting_sentence(text: str, answer: str) -> str:
    """The sentence of `text` sharing most words with `answer` (the first on a tie)."""
    sentences = [s for s in _SENTENCE.split(text.strip()) if s.strip()] or [text]
    want = words(answer)
    return max(sentences, key=lambda s: len(want & words(s)))


def read_pairs(location: str) -> list[dict]:
    """The question/answer pairs, or exit 2 naming the file and line of the first bad one."""
    pairs = []
    for n, row in jsonl.objects(location, "index.raft.questions", '{"question": ..., "answer": ...}',
                                "question/answer pairs"):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("question", "answer")):
            raise UserError(f"index.raft.questions: {location}:{n} needs non-empty string fields 'question' and "
                            "'answer'")
        if "chunk_id" in row and not isinstance(row["chunk_id"], str):
            raise UserError(f"index.raft.questions: {location}:{n}: chunk_id must be a string")
        pairs.append({**row, "line": n})
    return pairs


def choose_oracle(hits: list[dict], answer: str) -> dict | None:
    """The hit holding most of the answer's words (the nearer on a tie), or None when even
    that one holds under MIN_SUPPORT of them."""
    if not hits:
        return None
    best = max(hits, key=lambda h: (support(h["text"], answer), h["score"]))
    return best if support(best["text"], answer) >= MIN_SUPPORT else None


def distractors_for(candidates: list[dict], oracle: dict, k: int) -> list[dict]:
    """The first k candidates (nearest first) that are not the oracle nor from its document."""
    out = [c for c in candidates if c["chunk_id"] != oracle["chunk_id"] and c["record_id"] != oracle["record_id"]]
    return out[:k]


def assemble(items: list[dict], k: int, p: float, seed: int) -> list[dict]:
    """RAFT examples from items {question, answer, oracle, distractors (>= k, nearest first)}:
    exactly round(p * n) of them, chosen by `seed`, keep the oracle in their context."""
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    keep = set(order[:round(p * len(items))])
    examples = []
    for i, item in enumerate(items):
        oracle, distractors = item["oracle"], item["distractors"][:k]
        context = ([oracle] if i in keep else []) + distractors
        rng.shuffle(context)
        answer = f"{prompt.quoted(supporting_sentence(oracle['text'], item['answer']))}\n{item['answer'].strip()}"
        examples.append({
            "messages": [{"role": "user", "content": prompt.render(item["question"], context)},
                         {"role": "assistant", "content": answer}],
            "oracle_chunk_id": oracle["chunk_id"],
            "oracle_in_context": i in keep,
            "distractor_chunk_ids": [d["chunk_id"] for d in distractors],
        })
    return examples


def _nearest_others(table, vector, oracle: dict, k: int, first: int, nprobes: int, refine: int | None,
                    where: str) -> list[dict]:
    """k distractors among the rows `where` admits, searching further than `first`
    candidates when the oracle's own document fills the nearest ones."""
    limit, rows = first, table.count_rows(where)
    while True:
        found = distractors_for(stores.of(table).nearest(table, vector, limit, nprobes, refine, where), oracle, k)
        if len(found) == k or limit >= rows:
            return found
        limit = min(rows, limit * 4)


def run_raft(cfg: RaylabConfig, out: str) -> dict:
    """Write RAFT examples to `out` (JSONL, local or s3://); returns the counts."""
    ix = cfg.index
    if ix.raft is None:
        raise UserError("--raft needs an index.raft section with at least `questions` (a JSONL of question/answer "
                        "pairs)")
    r, directory = ix.raft, index_directory(cfg)
    pairs = read_pairs(r.questions)
    manifest, table = open_index(directory)
    _, path = embedder.resolve(manifest.model)
    vectors = embedder.encode(path, [p["question"] for p in pairs] + [p["answer"] for p in pairs])
    questions, answers = vectors[:len(pairs)], vectors[len(pairs):]
    items, unsupported, where = [], [], stores.of(table).access_filter(r.org)
    for pair, q_vec, a_vec in zip(pairs, questions, answers, strict=True):
        if "chunk_id" in pair:
            oracle = stores.of(table).by_id(table, pair["chunk_id"], where)
            if oracle is None:
                raise UserError(f"index.raft.questions: line {pair['line']} names chunk_id {pair['chunk_id']!r}, "
                                f"which is not in the index at {directory} or not readable by index.raft.org="
                                f"{r.org!r}")
        else:
            oracle = choose_oracle(stores.of(table).nearest(table, a_vec, r.candidates, ix.ann.nprobes, ix.ann.refine_factor,
                                                 where), pair["answer"])
            if oracle is None:
                unsupported.append(pair["line"])
                continue
        distractors = _nearest_others(table, q_vec, oracle, r.distractors, r.candidates, ix.ann.nprobes,
                                      ix.ann.refine_factor, where)
        if len(distractors) < r.distractors:
            raise UserError(f"index.raft.distractors={r.distractors}: the index at {directory} has only "
                            f"{len(distractors)} chunk(s) outside the oracle's document for line {pair['line']}"
                            + (f" readable by index.raft.org={r.org!r}" if r.org else " without an org"))
        items.append({**pair, "oracle": oracle, "distractors": distractors})
    if not items:
        raise UserError(f"index.raft.questions: no answer in {r.questions} is supported by an indexed chunk "
                        f"readable by index.raft.org={r.org!r} (each needs one holding at least {MIN_SUPPORT:.0%} of "
                        "its words); index the documents they come from, set index.raft.org, or name each pair's "
                        "chunk_id")
    examples = assemble(items, r.distractors, r.oracle_fraction, r.seed)
    storage.write_text(out, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    counts = {"examples": len(examples), "with_oracle": sum(e["oracle_in_context"] for e in examples),
              "distractors": r.distractors, "skipped_unsupported": unsupported, "out": out}
    log.info(f"raft: {counts['examples']} example(s), {counts['with_oracle']} with the oracle in context, "
             f"{r.distractors} distractor(s) each -> {out}"
             + (f"; skipped line(s) {unsupported}: no indexed chunk supports the answer" if unsupported else ""))
    return counts
