"""The sweep report without a sweep: the [0, 1] encoding, the RBF kernel-ridge surrogate, partial
dependence on known functions, the Optuna study rebuilt from result rows, and the results
table and CSV."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math

import numpy as np
import optuna
import pytest

from raylab.config import SearchDim
from raylab.tune import report

LR, BS = "train.lr", "train.batch_size"
SPACE = {LR: SearchDim(loguniform=(1e-5, 1e-1)), BS: SearchDim(choice=[4, 8, 16])}


def bowl(lr: float, centre: float = -3.0) -> float:
    """A smooth metric of lr alone, smallest at lr = 10**centre."""
    return (math.log10(lr) - centre) ** 2


def trials(metric=lambda lr, bs: bowl(lr), n: int = 12) -> list[dict]:
    """n trials spread over the lr range, batch sizes taken in turn."""
    return [{LR: float(lr), BS: SPACE[BS].choice[i % 3], "val_loss": metric(float(lr), SPACE[BS].choice[i % 3])}
            for i, lr in enumerate(np.geomspace(1e-5, 1e-1, n))]


def fitted(rows: list[dict], y: np.ndarray | None = None):
    enc = report._Encoder(SPACE)
    y = np.array([r["val_loss"] for r in rows]) if y is None else y
    return enc, report._fit(enc.matrix(rows), y)


def concordance(pred: np.ndarray, truth: np.ndarray, margin: float = 0.25) -> float:
    """Share of pairs (whose true values differ by more than margin) that pred orders like truth."""
    pairs = [(i, j) for i, j in itertools.combinations(range(len(truth)), 2) if abs(truth[i] - truth[j]) > margin]
    return float(np.mean([np.sign(pred[i] - pred[j]) == np.sign(truth[i] - truth[j]) for i, j in pairs]))


def curve_range(curve: dict) -> float:
    return max(curve["mean_prediction"]) - min(curve["mean_prediction"])


# ---------------------------------------------------------------- _Encoder


def test_encoder_maps_loguniform_bounds_to_0_and_1_on_a_log_scale():
    column = report._Encoder(SPACE).column(LR, [1e-5, 1e-3, 1e-1, 1e-4])
    assert column.shape == (4, 1)
    np.testing.assert_allclose(column[:, 0], [0.0, 0.5, 1.0, 0.25], atol=1e-12)
    # Negative control: on a linear scale 1e-3 would sit near 0.01, not in the middle.
    assert abs((1e-3 - 1e-5) / (1e-1 - 1e-5) - 0.5) > 0.4


def test_encoder_scales_uniform_and_randint_linearly():
    enc = report._Encoder({"u": SearchDim(uniform=(0.0, 0.2)), "r": SearchDim(randint=(2, 12))})
    np.testing.assert_allclose(enc.column("u", [0.0, 0.05, 0.2])[:, 0], [0.0, 0.25, 1.0])
    np.testing.assert_allclose(enc.column("r", [2, 7, 11])[:, 0], [0.0, 0.5, 0.9])  # randint's high is exclusive


def test_encoder_one_hot_encodes_choices_in_their_order():
    column = report._Encoder(SPACE).column(BS, [8, 4, 16, 8])
    np.testing.assert_array_equal(column, [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])


def test_encoder_one_hot_matches_list_choices_by_value():
    dim = SearchDim(choice=[["q_proj"], ["q_proj", "v_proj"], {"r": 8}])
    column = report._Encoder({"m": dim}).column("m", [["q_proj", "v_proj"], {"r": 8}, ["q_proj"]])
    np.testing.assert_array_equal(column, [[0, 1, 0], [0, 0, 1], [1, 0, 0]])


def test_encoder_matrix_stacks_columns_in_search_space_order():
    matrix = report._Encoder(SPACE).matrix([{BS: 16, LR: 1e-1, "val_loss": 1.0}, {LR: 1e-5, BS: 4}])
    np.testing.assert_allclose(matrix, [[1, 0, 0, 1], [0, 1, 0, 0]])


# ---------------------------------------------------------------- _fit


def test_fit_predicts_a_smooth_function_at_its_training_points():
    rows = trials()
    enc, predict = fitted(rows)
    y = np.array([r["val_loss"] for r in rows])
    # Within 5% of the metric's range (0..4): a ridge-regularised fit, not an interpolation.
    np.testing.assert_allclose(predict(enc.matrix(rows)), y, atol=0.05 * np.ptp(y))


def test_fit_ranks_unseen_grid_points_like_the_function():
    enc, predict = fitted(trials())
    grid = report._grid(SPACE[LR])
    truth = np.array([bowl(g) for g in grid])
    pred = predict(enc.matrix([{LR: g, BS: 8} for g in grid]))
    assert concordance(pred, truth) == 1.0
    assert grid[int(np.argmin(pred))] == pytest.approx(1e-3)


def test_fit_on_a_shuffled_metric_loses_the_ranking():
    # Negative control for the ranking test: the same inputs with their metric values shuffled.
    # One shuffle may keep much of the order by chance (the bowl is symmetric), so average 20.
    rows = trials()
    y = np.array([r["val_loss"] for r in rows])
    enc = report._Encoder(SPACE)
    grid = report._grid(SPACE[LR])
    probe = enc.matrix([{LR: g, BS: 8} for g in grid])
    truth = np.array([bowl(g) for g in grid])
    scores = [concordance(report._fit(enc.matrix(rows), y[np.random.default_rng(seed).permutation(len(y))])(probe), truth)
              for seed in range(20)]
    assert np.mean(scores) < 0.7, scores


def test_fit_of_a_constant_metric_predicts_the_constant():
    rows = [{**r, "val_loss": 0.7} for r in trials()]
    enc, predict = fitted(rows)
    np.testing.assert_allclose(predict(enc.matrix([{LR: 3e-4, BS: 16}, {LR: 1e-2, BS: 4}])), 0.7)


# ---------------------------------------------------------------- _grid


def test_grid_per_kind():
    lr = report._grid(SPACE[LR])
    assert len(lr) == report.GRID and lr[0] == pytest.approx(1e-5) and lr[-1] == pytest.approx(1e-1)
    np.testing.assert_allclose(np.diff(np.log(lr)), math.log(1e4) / (report.GRID - 1))  # even on a log scale
    u = report._grid(SearchDim(uniform=(0.0, 0.3)))
    assert len(u) == report.GRID and u[0] == 0.0 and u[-1] == pytest.approx(0.3)
    np.testing.assert_allclose(np.diff(u), 0.3 / (report.GRID - 1))
    assert report._grid(SPACE[BS]) == [4, 8, 16]


def test_grid_randint_stays_within_its_exclusive_high():
    assert report._grid(SearchDim(randint=(0, 3))) == [0, 1, 2]
    assert report._grid(SearchDim(randint=(5, 6))) == [5]
    wide = report._grid(SearchDim(randint=(1, 100)))
    assert wide[0] == 1 and wide[-1] == 99 and len(wide) == report.GRID
    assert all(isinstance(v, int) for v in wide) and wide == sorted(set(wide))


# ---------------------------------------------------------------- partial_dependence


def test_partial_dependence_follows_the_parameter_the_metric_depends_on():
    pd = report.partial_dependence(trials(), SPACE, "val_loss", [LR, BS])
    lr = pd[LR]
    assert lr["grid"] == report._grid(SPACE[LR]) and lr["log_scale"] is True
    assert len(lr["mean_prediction"]) == report.GRID
    # The minimum is at the true optimum (lr = 1e-3), within one grid step (1/6 decade).
    best = lr["grid"][int(np.argmin(lr["mean_prediction"]))]
    assert abs(math.log10(best) + 3) <= 4 / (report.GRID - 1) + 1e-9
    truth = np.array([bowl(g) for g in lr["grid"]])
    assert concordance(np.array(lr["mean_prediction"]), truth) == 1.0
    assert curve_range(lr) > 0.7 * np.ptp(truth)


def test_partial_dependence_minimum_moves_with_the_optimum():
    # Negative control for the location: the same trials around another optimum (lr = 1e-2).
    pd = report.partial_dependence(trials(lambda lr, bs: bowl(lr, centre=-2.0)), SPACE, "val_loss", [LR])
    best = pd[LR]["grid"][int(np.argmin(pd[LR]["mean_prediction"]))]
    assert abs(math.log10(best) + 2) <= 4 / (report.GRID - 1) + 1e-9


def test_partial_dependence_is_flat_in_a_parameter_without_effect():
    pd = report.partial_dependence(trials(), SPACE, "val_loss", [LR, BS])
    bs = pd[BS]
    assert bs["grid"] == [4, 8, 16] and bs["log_scale"] is False
    assert curve_range(bs) < 0.05 * curve_range(pd[LR]), (bs["mean_prediction"], curve_range(pd[LR]))


def test_partial_dependence_of_a_parameter_with_effect_is_not_flat():
    # Negative control for flatness: the same trials with batch size adding 0, 1, 2 to the metric.
    effect = {4: 0.0, 8: 1.0, 16: 2.0}
    pd = report.partial_dependence(trials(lambda lr, bs: bowl(lr) + effect[bs]), SPACE, "val_loss", [BS])
    curve = pd[BS]["mean_prediction"]
    assert curve[0] < curve[1] < curve[2]
    assert curve_range(pd[BS]) > 1.0


def test_partial_dependence_uses_only_usable_rows_and_reports_them():
    rows = trials()
    spoiled = rows + [{LR: 1e-3, BS: 8, "val_loss": None}, {LR: 1e-3, BS: 4, "val_loss": float("nan")}]
    pd = report.partial_dependence(spoiled, SPACE, "val_loss", [LR])
    assert pd[LR]["observed"] == [[r[LR], r["val_loss"]] for r in rows]
    np.testing.assert_allclose(pd[LR]["mean_prediction"],
                               report.partial_dependence(rows, SPACE, "val_loss", [LR])[LR]["mean_prediction"])
    assert all(math.isfinite(v) for v in pd[LR]["mean_prediction"])


# ---------------------------------------------------------------- _usable / study_of


def test_usable_keeps_finite_numbers_only():
    rows = [{"id": 0, "m": 1.5}, {"id": 1, "m": 2}, {"id": 2, "m": None}, {"id": 3, "m": float("nan")},
            {"id": 4, "m": float("inf")}, {"id": 5}, {"id": 6, "m": "0.3"}, {"id": 7, "m": -0.0}]
    assert [r["id"] for r in report._usable(rows, "m")] == [0, 1, 7]
    assert report._usable([], "m") == []


@pytest.mark.parametrize(("mode", "direction", "best"), [
    ("min", optuna.study.StudyDirection.MINIMIZE, 0.5),
    ("max", optuna.study.StudyDirection.MAXIMIZE, 2.0),
])
def test_study_of_rebuilds_the_usable_trials(mode, direction, best):
    space = {**SPACE, "model.lora.target_modules": SearchDim(choice=[["q_proj"], ["q_proj", "v_proj"]])}
    rows = [
        {LR: 1e-4, BS: 4, "model.lora.target_modules": ["q_proj"], "val_loss": 1.0},
        {LR: 1e-3, BS: 8, "model.lora.target_modules": ["q_proj", "v_proj"], "val_loss": 0.5},
        {LR: 1e-2, BS: 16, "model.lora.target_modules": ["q_proj"], "val_loss": 2.0},
        {LR: 1e-2, BS: 16, "model.lora.target_modules": ["q_proj"], "val_loss": None},
        {LR: 1e-5, BS: 4, "model.lora.target_modules": ["q_proj"], "val_loss": float("nan")},
    ]
    study = report.study_of(rows, space, "val_loss", mode)
    assert study.directions == [direction]
    assert len(study.trials) == 3
    assert [t.value for t in study.trials] == [1.0, 0.5, 2.0]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.best_value == best
    second = study.trials[1].params
    assert second == {LR: 1e-3, BS: 8, "model.lora.target_modules": '["q_proj", "v_proj"]'}  # list choices as JSON
    assert isinstance(study.trials[0].distributions[LR], optuna.distributions.FloatDistribution)
    assert study.trials[0].distributions[LR].log is True


# ---------------------------------------------------------------- results: _csv / table


def result_rows() -> list[dict]:
    return [
        {"rank": 1, "trial_id": "aaaa0001", "status": "finished", LR: 0.000123456, "model.lora.target_modules": ["q_proj"],
         "val_loss": 0.51234567, "best_val_loss": 0.5, "steps": 24, "steps_run": 24, "reports": 3,
         "final_model": "/runs/t/aaaa0001/final", "error": None, "index": 0},
        {"rank": 2, "trial_id": "aaaa0002", "status": "error", LR: 0.01, "model.lora.target_modules": ["q_proj", "v_proj"],
         "val_loss": None, "best_val_loss": None, "steps": None, "steps_run": 0, "reports": None,
         "final_model": None, "error": "RuntimeError: CUDA out of memory", "index": 1},
    ]


def test_csv_columns_values_and_json_for_lists():
    keys = [LR, "model.lora.target_modules"]
    text = report._csv(result_rows(), keys, "val_loss")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0]) == ["rank", "trial_id", "status", *keys, "val_loss", "best_val_loss", "steps",
                               "steps_run", "final_model", "error"]  # "reports" and "index" are left out
    assert parsed[0]["trial_id"] == "aaaa0001" and float(parsed[0]["val_loss"]) == 0.51234567
    assert json.loads(parsed[1]["model.lora.target_modules"]) == ["q_proj", "v_proj"]
    assert parsed[1]["val_loss"] == "" and parsed[1]["final_model"] == ""  # None is an empty cell
    assert parsed[1]["error"] == "RuntimeError: CUDA out of memory"


def test_table_aligns_columns_formats_floats_and_lists_errors():
    keys = [LR, "model.lora.target_modules"]
    lines = report.table(result_rows(), keys, "val_loss").splitlines()
    header, first, second = lines[:3]
    assert header.split() == ["rank", "trial_id", "status", *keys, "val_loss", "steps"]
    assert first.split()[:4] == ["1", "aaaa0001", "finished", "0.0001235"]  # 4 significant digits
    assert "0.5123" in first.split() and "24" in first.split()
    assert second.split()[-2:] == ["-", "-"]  # no metric, no steps
    assert len({header.index("val_loss"), first.index("0.5123"), second.index("-", second.index("v_proj"))}) == 1
    assert lines[3:] == ["errors:", "  aaaa0002: RuntimeError: CUDA out of memory"]


def test_table_has_no_error_section_without_errors():
    rows = result_rows()[:1]
    text = report.table(rows, [LR], "val_loss")
    assert "errors:" not in text and len(text.splitlines()) == 2
