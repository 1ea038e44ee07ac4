"""The train stage's progress line: no `nan tok/s` or `ETA ?` before a rate exists."""

from __future__ import annotations

from raylab.train.metrics import progress_line


def test_first_evaluation_has_no_rate_or_eta():
    line = progress_line({"step": 0, "val_loss": 5.565, "lr": 2e-4, "tokens_per_s": float("nan"), "mfu": float("nan")},
                         8, 2.0, 0)
    assert line == "train: step 0/8 (0%) val 5.565 before training | 0m02s"
    resumed = progress_line({"step": 4, "val_loss": 5.5, "lr": 1e-4, "tokens_per_s": float("nan"), "mfu": float("nan")},
                            8, 1.0, 4)
    assert "resumed here" in resumed and "nan" not in resumed and "ETA" not in resumed


def test_a_training_step_shows_rate_and_eta():
    line = progress_line({"step": 2, "loss": 5.56, "val_loss": 5.565, "lr": 1.7e-4, "tokens_per_s": 812.0, "mfu": 0.008},
                         8, 30.0, 0)
    assert line == "train: step 2/8 (25%) loss 5.560 val 5.565 lr 1.7e-04 | 812 tok/s mfu 0.8% | 0m30s, ETA 1m30s"
