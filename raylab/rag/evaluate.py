"""Retrieval evaluation (`raylab eval CONFIG --rag`): how well the built index finds what a
labelled question set says it should.

    raylab eval configs/quickstart.yaml --rag      # writes <output_dir>/eval/rag.json, prints a table
    raylab.rag.run_rag_eval(cfg)                   # Python; returns the report

`index.eval.questions` is a JSONL file, one labelled question a line:

    {"question": "How long do refunds take?", "relevant": ["handbook/refunds.md"], "answer": "..."}

- `relevant` lists keys; a retrieved chunk matches a key equal to its `chunk_id`, its
  `record_id` or its document's `origin` (path, URL or key; a JSONL record's is FILE:LINE).
  Origins and record ids name documents and survive re-chunking (a new `chunk_tokens` gives
  new chunk ids); chunk ids pin one chunk. Each key is one relevant item.
- recall@k: per question, the share of its relevant keys matched by one of the k chunks
  retrieved for it, averaged over questions (with one key per question: the share of
  questions whose document is in the top k).
- MRR@k: the mean of 1/rank of the first retrieved chunk matching any relevant key (0 when
  none of the k does).
- faithfulness (questions with an `answer`, e.g. the one a served model gave): the share of
  answer sentences supported by a chunk retrieved for the question; a sentence is supported
  when one chunk holds at least `index.eval.min_overlap` (default 0.5) of its content words
  (lower-cased \\w+ words less a fixed list of English stop words, which any text shares).
  Token overlap, not entailment: a sentence that reuses a chunk's words to say the opposite
  passes. No NLI model is used (none ships offline here).
- search: `index.eval.search` (vector, or hybrid as serve.rag.search) as a caller of
  `index.eval.org` (default none: only chunks without an org), both recorded in the report.
- latency: each question embedded alone and searched (what a serving request does), timed
  after one untimed warm-up query; p50 and p95 in milliseconds. Measured and reported only.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import time

from raylab.config import RaylabConfig
from raylab.core import runs
from raylab.errors import UserError
from raylab.rag import embedder, jsonl
from raylab.rag.search import open_index, ranked
from raylab.rag.stage import index_directory

log = logging.getLogger(__name__)

KEY = "index.eval.questions"
_WORD = re.compile(r"\w+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
# Function words every English text shares: left in, they would 'support' any sentence.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both but
by can could did do does doing down during each few for from further had has have having he her here hers him his
how i if in into is it its itself just me more most my no nor not now of off on once only or other our ours out over
own same she should so some such than that the their theirs them then there these they this those through to too
under until up very was we were what when where which while who whom why will with would yes you your yours
""".split())


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


def sentences(text: str) -> list[str]:
    """The sentences of `text` that hold a content word (a bare "Yes." is not a claim)."""
    return [s.strip() for s in _SENTENCE.split(text.strip()) if content_words(s)]


def chunk_keys(hit: dict) -> set[str]:
    """The keys a label may name a retrieved chunk by."""
    return {str(hit[k]) for k in ("chunk_id", "record_id", "origin") if hit.get(k) is not None}


def recall_at_k(retrieved: list[set[str]], relevant: set[str], k: int) -> float:
    """Share of `relevant` keys matched by one of the first k retrieved chunks (each a set of keys)."""
    if not relevant:
        raise ValueError("a question needs at least one relevant key")
    found = set().union(*retrieved[:k]) if retrieved[:k] else set()
    return len(relevant & found) / len(relevant)


def reciprocal_rank(retrieved: list[set[str]], relevant: set[str], k: int) -> float:
    """1/rank of the first of the k retrieved chunks matching a relevant key, else 0."""
    for rank, keys in enumerate(retrieved[:k], 1):
        if keys & relevant:
            return 1.0 / rank
    return 0.0


def supported(sentence: str, chunk_texts: list[str], min_overlap: float) -> bool:
    want = content_words(sentence)
    return bool(want) and any(len(want & content_words(t)) / len(want) >= min_overlap for t in chunk_texts)


def faithfulness(answer: str, chunk_texts: list[str], min_overlap: float) -> tuple[int, int]:
    """(supported sentences, sentences) of `answer` against the retrieved chunks' texts."""
    said = sentences(answer)
    return sum(supported(s, chunk_texts, min_overlap) for s in said), len(said)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low, high = math.floor(at), math.ceil(at)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def read_questions(location: str) -> list[dict]:
    """The labelled questions, or exit 2 naming the file and line of the first bad one."""
    out = []
    for n, row in jsonl.objects(location, KEY, '{"question": ..., "relevant": [chunk_id, record_id or origin, ...]}',
                                "questions"):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise UserError(f"{KEY}: {location}:{n} needs a non-empty string field 'question'")
        relevant = row.get("relevant")
        if not isinstance(relevant, list) or not relevant or not all(isinstance(r, str) and r for r in relevant):
            raise UserError(f"{KEY}: {location}:{n} needs 'relevant': a non-empty list of chunk ids, record ids or "
                            "origins")
        if "answer" in row and not isinstance(row["answer"], str):
            raise UserError(f"{KEY}: {location}:{n}: 'answer' must be a string")
        out.append({**row, "line": n})
    return out


def run_rag_eval(cfg: RaylabConfig) -> dict:
    """Evaluate the index `cfg` names on `index.eval.questions`; returns the report, also
    written to <output_dir>/eval/rag.json."""
    ev = cfg.index.eval
    if ev is None:
        raise UserError("--rag needs an index.eval section with at least `questions` (a JSONL of "
                        '{"question": ..., "relevant": [...]} lines)')
    questions = read_questions(ev.questions)
    directory, ann = index_directory(cfg), cfg.index.ann
    manifest, table = open_index(directory)
    _, path = embedder.resolve(manifest.model)

    def retrieve(question: str) -> list[dict]:
        return ranked(table, embedder.encode(path, [question])[0], question, ev.k, ann.nprobes, ann.refine_factor,
                      ev.search, ev.org)

    try:  # warm-up, untimed: the model's first call and LanceDB's first scan pay one-off costs
        retrieve(questions[0]["question"])
    except UserError as e:
        raise UserError(f"index.eval.search: {e}") from None
    rows, latencies, said, backed = [], [], 0, 0
    for q in questions:
        started = time.perf_counter()
        hits = retrieve(q["question"])
        latencies.append((time.perf_counter() - started) * 1000)
        keys, relevant = [chunk_keys(h) for h in hits], set(q["relevant"])
        row = {"line": q["line"], "question": q["question"], "recall": recall_at_k(keys, relevant, ev.k),
               "reciprocal_rank": reciprocal_rank(keys, relevant, ev.k),
               "retrieved": [{"chunk_id": h["chunk_id"], "origin": h["origin"], "score": round(h["score"], 4)}
                             for h in hits]}
        if "answer" in q:
            ok, n = faithfulness(q["answer"], [h["text"] for h in hits], ev.min_overlap)
            row["faithfulness"] = ok / n if n else None
            said, backed = said + n, backed + ok
        rows.append(row)
    report = runs.RagEvalReport(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), index=directory,
        model=manifest.model, questions=ev.questions, k=ev.k, search=ev.search, org=ev.org, count=len(rows),
        recall_at_k=sum(r["recall"] for r in rows) / len(rows),
        mrr=sum(r["reciprocal_rank"] for r in rows) / len(rows),
        faithfulness=backed / said if said else None, answers=sum("answer" in q for q in questions),
        answer_sentences=said, supported_sentences=backed, min_overlap=ev.min_overlap,
        latency_ms={"p50": round(percentile(latencies, 50), 3), "p95": round(percentile(latencies, 95), 3)},
        per_question=rows)
    written = runs.write_json(runs.Run(cfg.output_dir).eval_file("rag"), report)
    log.info(f"eval --rag: recall@{ev.k} {report.recall_at_k:.3f}, MRR@{ev.k} {report.mrr:.3f} over {len(rows)} "
             f"question(s) -> {written}")
    return report.model_dump(mode="json")


def eval_table(report: dict) -> str:
    """The report as a small table for the console."""
    k, f = report["k"], report["faithfulness"]
    lines = [("questions", str(report["count"])), (f"recall@{k}", f"{report['recall_at_k']:.3f}"),
             (f"MRR@{k}", f"{report['mrr']:.3f}"),
             ("faithfulness", "n/a (no answers)" if f is None else
              f"{f:.3f} ({report['supported_sentences']}/{report['answer_sentences']} sentences, "
              f"overlap >= {report['min_overlap']})"),
             ("latency p50", f"{report['latency_ms']['p50']:.1f} ms"),
             ("latency p95", f"{report['latency_ms']['p95']:.1f} ms")]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)
