"""The filters between a parsed answer and a kept example, each counted in the datasheet with
examples of what it dropped (`Tally`).

    f = Filters(cfg.synth.filters, cfg.data.pii, eval_texts)
    text = f.redact(text)                      # PII -> <EMAIL>, ... (first: nothing after sees it)
    reason = f.check(prompt, response)         # "length" | "refusal" | "contaminated" | None
    kept, similar, score = novelty.offer(prompt)   # ROUGE-L novelty against what is kept
    why = evolution_failure(source, evolved, markers)    # Evol-Instruct's eliminator: the instruction
    why = f.answer_failure(response, short_words)        # ... and its answer

Novelty (Self-Instruct's rule: keep a prompt only if its ROUGE-L with every kept one is below
0.7) is done without comparing every pair: each kept prompt's MinHash signature (the data
stage's, raylab.data.minhash, over character shingles) is banded into an LSH table, a new
prompt is compared by exact ROUGE-L (rouge_score, the paper's implementation) only with the
kept prompts sharing a band, so the work grows with the candidates, not with everything kept.
What the candidate stage misses is measured: `recall()` compares a sample exhaustively and
reports the share of its pairs above the threshold that shared a band.

Decontamination: an example sharing a word 13-gram with an evaluation text is dropped (the
GPT-3 paper's test); an evaluation text shorter than that (at least MIN_WHOLE_WORDS words)
counts when the example contains it whole.

Evol-Instruct's eliminator (Xu et al., 2023, section 3.3): a failed evolution is one whose
instruction copies words of the evolving prompt ("given prompt", "#Rewritten Prompt#":
`copies_prompt`) or provides no information gain over the original (the paper asks ChatGPT
whether the two are equal; here, lexically: no word the original lacks, `no_gain`), or whose
answer is a refusal that is also short (a refusal pattern and under `short_answer_words`
words, the paper's "contains 'sorry' and is relatively short": `refusal`) or only
punctuation and stop words (`no_content`).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

from raylab.core import detectors
from raylab.data import minhash
from raylab.errors import UserError

MIN_WHOLE_WORDS = 5  # shorter evaluation texts ("yes", "Acme Inc.") would match everything
EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 300
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


# The paper's "only punctuation and stop words" rule needs a stop-word list: NLTK's English one.
STOP_WORDS = frozenset("""
a about above after again against ain all am an and any are aren as at be because been before being below
between both but by can couldn d did didn do does doesn doing don down during each few for from further had
hadn has hasn have haven having he her here hers herself him himself his how i if in into is isn it its itself
just ll m ma me mightn more most mustn my myself needn no nor not now o of off on once only or other our ours
ourselves out over own re s same shan she should shouldn so some such t than that the their theirs them
themselves then there these they this those through to too under until up ve very was wasn we were weren what
when where which while who whom why will with won wouldn y you your yours yourself yourselves
""".split())


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def evolution_failure(original: str, evolved: str, markers: list[str]) -> str | None:
    """Why an evolved instruction failed (`copies_prompt`, `no_gain`), or None."""
    low = evolved.lower()
    if any(m.lower() in low for m in markers):
        return "copies_prompt"
    if set(words(evolved)) <= set(words(original)):
        return "no_gain"
    return None


class Tally:
    """Counts per reason, and the first few examples of each, for the datasheet."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list] = defaultdict(list)

    def add(self, reason: str, example: str | dict | None = None) -> None:
        self.counts[reason] += 1
        if example is not None and len(self.examples[reason]) < EXAMPLES_PER_REASON:
            if isinstance(example, str):
                example = example[:EXAMPLE_CHARS]
            self.examples[reason].append(example)

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": {k: v for k, v in sorted(self.examples.items())}}


class Contamination:
    """Word n-grams of the evaluation texts."""

    def __init__(self, texts: list[str], n: int):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.whole: set[str] = set()
        for t in texts:
            w = words(t)
            if len(w) >= n:
                self.grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
            elif len(w) >= MIN_WHOLE_WORDS:
                self.whole.add(" ".join(w))

    def __len__(self) -> int:
        return len(self.grams) + len(self.whole)

    def hit(self, text: str) -> bool:
        w = words(text)
        if any(tuple(w[i:i + self.n]) in self.grams for i in range(len(w) - self.n + 1)):
            return True
        joined = f" {' '.join(w)} "
        return any(f" {s} " in joined for s in self.whole)


class Novelty:
    """ROUGE-L novelty against everything kept, with MinHash/LSH candidates."""

    def __init__(self, threshold: float, num_perm: int, bands: int, ngram: int, recall_sample: int = 0, seed: int = 0):
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise UserError("raylab synth needs the `synth` extra (rouge-score, httpx): pip install 'raylab[synth]'") from None

        self.threshold, self.num_perm, self.bands, self.ngram = threshold, num_perm, bands, ngram
        self.rows = num_perm // bands
        self.scorer = rouge_scorer.RougeScorer(["rougeL"])
        self.buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
        self.kept: list[str] = []
        self.compared = 0  # exact ROUGE-L computations: what the candidates saved
        self.recall_sample = recall_sample
        self.offered: list[str] = []  # reservoir of offered prompts for recall()
        self._seen = 0
        self._rng = random.Random(seed)

    def rouge_l(self, a: str, b: str) -> float:
        return self.scorer.score(a, b)["rougeL"].fmeasure

    def band_keys(self, text: str) -> list[tuple[int, bytes]]:
        sig = minhash(_SPACE.sub(" ", text.lower()).strip(), self.num_perm, self.ngram)
        return [(b, sig[b * self.rows:(b + 1) * self.rows].tobytes()) for b in range(self.bands)]

    def offer(self, text: str) -> tuple[bool, str | None, float]:
        """(kept, the most similar kept prompt, its ROUGE-L); a kept prompt joins the index."""
        self._sample(text)
        keys = self.band_keys(text)
        candidates = {i for k in keys for i in self.buckets.get(k, ())}
        best, best_score = None, 0.0
        for i in sorted(candidates):
            self.compared += 1
            score = self.rouge_l(text, self.kept[i])
            if score > best_score:
                best, best_score = self.kept[i], score
        if best_score >= self.threshold:
            return False, best, best_score
        for k in keys:
            self.buckets[k].append(len(self.kept))
        self.kept.append(text)
        return True, best, best_score

    def _sample(self, text: str) -> None:
        # reservoir sampling: a uniform sample of everything offered, whatever the run's size
        self._seen += 1
        if len(self.offered) < self.recall_sample:
            self.offered.append(text)
        elif self.recall_sample:
            j = self._rng.randrange(self._seen)
            if j < self.recall_sample:
                self.offered[j] = text

    def recall(self) -> dict:
        """The candidate stage's recall on the sample: of its pairs with ROUGE-L >= threshold,
        the share that share an LSH band (and so would have been compared)."""
        sample = self.offered
        keys = [set(self.band_keys(t)) for t in sample]
        similar = found = 0
        for i in range(len(sample)):
            for j in range(i + 1, len(sample)):
                if self.rouge_l(sample[i], sample[j]) >= self.threshold:
                    similar += 1
                    found += bool(keys[i] & keys[j])
        return {"sample": len(sample), "similar_pairs": similar, "found_by_candidates": found,
                "recall": round(found / similar, 4) if similar else None}


class Filters:
    """PII redaction, length, refusal and decontamination, with their tallies."""

    def __init__(self, f, pii, eval_texts: list[str]):
        self.f = f
        self.detectors = detectors.for_engine(pii.types, pii.engine, pii.regions) if f.pii and pii.enabled else []
        self.refusals = [re.compile(p, re.IGNORECASE) for p in f.refusals]
        self.contamination = Contamination(eval_texts, f.decontaminate_ngram)
        self.pii: Counter = Counter()  # redactions per PII type
        self.redacted_texts = 0

    def redact(self, text: str) -> str:
        if not self.detectors:
            return text
        out, counts = detectors.redact(text, self.detectors)
        if counts:
            self.pii.update(counts)
            self.redacted_texts += 1
        return out

    def answer_failure(self, response: str, short_words: int) -> str | None:
        """Why an evolved instruction's answer fails it (`refusal`, `no_content`), or None."""
        w = words(response)
        if len(w) < short_words and any(p.search(response) for p in self.refusals):
            return "refusal"
        if all(x in STOP_WORDS for x in w):
            return "no_content"
        return None

    def check(self, prompt: str, response: str) -> str | None:
        """The first filter that drops this example, or None to keep it."""
        if not all(self.f.min_chars <= len(t.strip()) <= self.f.max_chars for t in (prompt, response)):
            return "length"
        if any(p.search(response) for p in self.refusals):
            return "refusal"
        if self.contamination.hit(f"{prompt}\n{response}"):
            return "contaminated"
        return None
