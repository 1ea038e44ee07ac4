"""The retrieval prompt: how retrieved chunks and a question become one user message.

    from raylab.rag import prompt
    text = prompt.render("How do I reset my password?", hits)     # hits: search() rows

One template for every place that puts chunks in front of a model: RAFT training examples
(raft.py) are written with it, so a model fine-tuned on them has learned the exact format it
is later asked in. Documents are numbered in the order given, each headed by where it came
from, so an answer can cite `[2]` and a reader can find the source.

RAFT answers quote their evidence between QUOTE_OPEN and QUOTE_CLOSE (the paper's
chain-of-thought markers), so a tuned model's quotes can be checked against the context.
"""

from __future__ import annotations

INSTRUCTION = ("Answer the question using the documents below. Quote the sentence that supports the answer. "
               "If the documents do not hold the answer, answer from what you know.")
QUOTE_OPEN, QUOTE_CLOSE = "##begin_quote##", "##end_quote##"


def document(n: int, chunk: dict) -> str:
    """One numbered document: `[n] (origin)` then its text."""
    where = chunk.get("origin") or chunk.get("source") or "unknown"
    return f"[{n}] ({where})\n{chunk['text'].strip()}"


def render(question: str, chunks: list[dict]) -> str:
    """The user message: the instruction, the documents in the given order, the question."""
    docs = "\n\n".join(document(i + 1, c) for i, c in enumerate(chunks))
    return f"{INSTRUCTION}\n\nDocuments:\n\n{docs}\n\nQuestion: {question.strip()}"


def quoted(sentence: str) -> str:
    return f"{QUOTE_OPEN}{sentence.strip()}{QUOTE_CLOSE}"
