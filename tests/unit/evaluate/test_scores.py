"""Evaluation scores: exact match and ROUGE-L on normalised words."""

from __future__ import annotations

import pytest

from raylab.evaluate import batch


@pytest.mark.parametrize(("prediction", "reference", "em", "rouge"), [
    ("The red widget ships today.", "the red widget ships today", True, 1.0),
    ("The blue widget ships today.", "The red widget ships today.", False, 0.8),
    ("", "anything", False, 0.0),
    ("red", "", False, 0.0),
])
def test_scores(prediction, reference, em, rouge):
    assert batch.exact_match(prediction, reference) is em
    assert batch.rouge_l(prediction, reference) == pytest.approx(rouge)
