"""Real text for the drift tests: the Acme corpus's user prompts (the training
distribution, split into training records and held-out "served" prompts) and installed
packages' descriptions (another corpus nobody on the project wrote)."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import random
import re

from rag_index import package_description

from conftest import REPO

ACME = REPO / "examples" / "acme"


def acme_prompts() -> list[str]:
    """Every user prompt of the Acme corpus: the FAQ's questions, the support chats' user
    turns (a line that is not JSON is skipped: the corpus plants some for the quarantine)."""
    texts = [row["question"] for row in csv.DictReader((ACME / "faq.csv").open(encoding="utf-8"))]
    for line in (ACME / "support_chats.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            continue
        texts += [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    for line in (ACME / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
    return [t for t in texts if t.strip()]


def split_acme() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): every fourth prompt held out."""
    texts = acme_prompts()
    return [t for i, t in enumerate(texts) if i % 4], [t for i, t in enumerate(texts) if i % 4 == 0]


def package_sentences(n: int, seed: int = 0) -> list[str]:
    """n sentences (20-200 characters) of installed packages' descriptions, drawn with `seed`."""
    out = []
    for d in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        out += [s for s in re.split(r"(?<=[.?!])\s+", package_description(d)) if 20 <= len(s) <= 200]
    out = sorted(set(out))
    assert len(out) >= n, f"only {len(out)} description sentences installed"
    return random.Random(seed).sample(out, n)
