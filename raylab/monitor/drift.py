"""Drift statistics: how far a sample of served prompts has moved from the training data.

    from raylab.monitor.drift import length_drift, token_drift, embedding_drift
    length_drift(training_texts, served_texts)      # 0.0 (same) .. 1.0 (disjoint)

Every statistic is a number in [0, 1], so one threshold (`serve.monitor.drift_threshold`)
reads the same on each:

- length: the Jensen-Shannon divergence (base 2) between the two histograms of prompt
  length in words, over bins cut at the training lengths' deciles (ends open);
- tokens: the Jensen-Shannon divergence (base 2) between the two unigram distributions of
  lower-cased word tokens over the training data's `vocabulary` most frequent tokens plus
  one bucket for every other token (so a prompt full of words training never saw moves
  mass into that bucket, and a small sample is not penalised for the long tail it cannot
  cover);
- embedding: the cosine distance between the mean embedding vectors of the two sets (the
  retrieval embedder's, when `serve.rag` or `index:` names one), halved into [0, 1].

Why Jensen-Shannon rather than the population stability index: PSI is unbounded and
undefined on an empty bin (it needs an arbitrary floor), JS is bounded, symmetric and
defined on empty bins, so the same threshold applies to every statistic.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: the unit both the length and the token statistic count."""
    return _WORD.findall(text.lower())


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence, base 2 (0: equal, 1: disjoint supports) of two
    distributions given as non-negative weights over the same bins (normalised here)."""
    sp, sq = float(sum(p)), float(sum(q))
    if sp <= 0 or sq <= 0:
        raise ValueError("both distributions need some mass")
    total = 0.0
    for a, b in zip(p, q, strict=True):
        a, b = a / sp, b / sq
        m = (a + b) / 2
        if a > 0:
            total += a * math.log2(a / m) / 2
        if b > 0:
            total += b * math.log2(b / m) / 2
    return min(1.0, max(0.0, total))


def _bin(value: float, edges: list[float]) -> int:
    """Index of the bin `value` falls in: bin i holds edges[i-1] < value <= edges[i]."""
    lo, hi = 0, len(edges)
    while lo < hi:
        mid = (lo + hi) // 2
        if value <= edges[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def length_drift(training: Sequence[str], served: Sequence[str], bins: int = 10) -> float:
    """JS divergence of the word-count histograms over the training deciles' bins."""
    lengths = sorted(len(words(t)) for t in training)
    if not lengths or not served:
        raise ValueError("length drift needs training texts and served prompts")
    edges = sorted({lengths[min(len(lengths) - 1, (len(lengths) * k) // bins)] for k in range(1, bins)})
    counts_t, counts_s = [0] * (len(edges) + 1), [0] * (len(edges) + 1)
    for n in lengths:
        counts_t[_bin(n, edges)] += 1
    for text in served:
        counts_s[_bin(len(words(text)), edges)] += 1
    return js_divergence(counts_t, counts_s)


def token_drift(training: Sequence[str], served: Sequence[str], vocabulary: int = 200) -> float:
    """JS divergence of the unigram distributions over the training data's `vocabulary`
    most frequent tokens and one bucket for all others."""
    counts_t = Counter(w for t in training for w in words(t))
    counts_s = Counter(w for t in served for w in words(t))
    if not counts_t or not counts_s:
        raise ValueError("token drift needs words in the training texts and in the served prompts")
    kept = [w for w, _ in counts_t.most_common(vocabulary)]
    other_t = sum(counts_t.values()) - sum(counts_t[w] for w in kept)
    other_s = sum(counts_s.values()) - sum(counts_s[w] for w in kept)
    return js_divergence([counts_t[w] for w in kept] + [other_t], [counts_s[w] for w in kept] + [other_s])


def embedding_drift(training, served) -> float:
    """Cosine distance between the mean embeddings, halved into [0, 1]: 0 when the two
    centroids point the same way. `training`, `served`: 2-D arrays, one row per text."""
    import numpy as np

    a, b = np.asarray(training, dtype=np.float64), np.asarray(served, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or not len(a) or not len(b) or a.shape[1] != b.shape[1]:
        raise ValueError("embedding drift needs two non-empty sets of vectors of one dimension")
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    norm = float(np.linalg.norm(ca) * np.linalg.norm(cb))
    if norm == 0:
        raise ValueError("a mean embedding is zero; no direction to compare")
    return float(min(1.0, max(0.0, (1.0 - float(ca @ cb) / norm) / 2)))
