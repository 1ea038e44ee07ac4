"""Evaluation scores: exact match and ROUGE-L on normalised words."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylab.evaluate import batch

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("prediction", "reference", "em", "rouge"), [
    ("The red widget ships today.", "the red widget ships today", True, 1.0),
    ("The blue widget ships today.", "The red widget ships today.", False, 0.8),
    ("", "anything", False, 0.0),
    ("red", "", False, 0.0),
])
def test_scores(prediction, reference, em, rouge):
    assert batch.exact_match(prediction, reference) is em
    assert batch.rouge_l(prediction, reference) == pytest.approx(rouge)


def test_rouge_l_agrees_with_the_reference_implementation():
    """raylab scores with its own 15-line ROUGE-L (no nltk/absl at run time for one LCS); it
    must agree with Google's rouge-score (the `test` extra) on English text, so the README's
    held-out ROUGE-L means what the usual tool would report."""
    import json

    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    lines = (REPO / "examples" / "acme" / "heldout.jsonl").read_text().splitlines()
    references = [json.loads(line)["reference"] for line in lines]
    predictions = ["Every Acme employee gets 27 vacation days per year.", "Acme offices are open Monday to Friday.",
                   "Travel expenses are approved by finance, then by your team lead.", "", "8:30 to 17:30",
                   "The X1 rocket's payload: 40 kg!", "Book rooms in the calendar; they hold 12 people."]
    pairs = [(p, r) for p in predictions for r in references]
    assert len(pairs) > 200
    for p, r in pairs:
        expected = scorer.score(r, p)["rougeL"].fmeasure
        assert batch.rouge_l(p, r) == pytest.approx(expected, abs=1e-9), (p, r)
    assert any(scorer.score(r, p)["rougeL"].fmeasure > 0.5 for p, r in pairs)  # not all zeros: the check has teeth
