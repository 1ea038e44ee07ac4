"""Tune stage on a real Ray: an Optuna TPE + ASHA sweep over train-stage runs with one
trial that fails, its outputs, the winner re-run from best.yaml, resume after a killed
driver, and the search-space checks made before anything runs."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import yaml

from conftest import base_config, callers_sigint, cli_here, kill_cli_when_ready, with_data
from raylab import config, train, tune
from raylab.core import logs, runs
from raylab.errors import UserError

pytestmark = pytest.mark.integration

# One choice names a module the model lacks: that trial fails inside its run (the train
# stage's own check) and must be recorded while the sweep goes on.
SPACE = {
    "train.lr": {"loguniform": [1e-3, 2e-2]},
    "model.lora.target_modules": {"choice": [["q_proj", "v_proj"], "all-linear", ["no_such_proj"]]},
}


def sweep_config(learn_data, out: Path, **tune_overrides) -> config.RaylabConfig:
    cfg = with_data(learn_data, out, max_steps=16, eval_every=4, log_every=4, checkpoint_every=8)
    raw = json.loads(cfg.model_dump_json())
    # One trial at a time: with deterministic training, TPE's proposals and ASHA's cuts are
    # then reproducible (concurrent trials report in whatever order the machine allows).
    # The first point names a module the model lacks, so one trial surely fails.
    raw["tune"] = {"search_space": SPACE, "num_samples": 5, "seed": 3, "max_concurrent_trials": 1,
                   "points_to_evaluate": [{"train.lr": 5e-3, "model.lora.target_modules": ["no_such_proj"]}],
                   "asha": {"grace_period": 4, "reduction_factor": 2}, **tune_overrides}
    return config.load_dict(raw)


@pytest.fixture(scope="module")
def sweep(learn_data, tmp_path_factory):
    cfg = sweep_config(learn_data, tmp_path_factory.mktemp("sweep") / "run")
    return cfg, tune.run_tune(cfg)


def test_sweep_runs_optuna_with_asha_and_records_the_failing_trial(sweep):
    cfg, summary = sweep
    rows = summary["results"]
    assert summary["trials"] == 5 and summary["searcher"] == "tpe" and summary["asha"]
    assert summary["errors"] >= 1
    failed = [r for r in rows if r["status"] == "error"]
    assert all(r["model.lora.target_modules"] == ["no_such_proj"] for r in failed)
    assert all("no_such_proj" in r["error"] for r in failed)
    assert summary["stopped_early"] >= 1, rows  # ASHA cut at least one trial
    stopped = [r for r in rows if r["status"] == "stopped early"]
    # ASHA's rungs are steps 4 and 8 (grace 4, factor 2, max_t 17); a stopped trial's
    # workers waited there for the decision, so none trained a step past its rung.
    assert all(r["steps"] in (4, 8) and r["steps_run"] == r["steps"] for r in stopped), stopped
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and all(r["steps"] == 16 and r["final_model"] for r in finished)
    assert [r["rank"] for r in rows] == list(range(1, 6))
    assert rows[0]["trial_id"] == summary["best"]["trial_id"]
    tune_dir = Path(cfg.output_dir) / "tune"
    assert (tune_dir / "study.db").exists()
    header = (tune_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["rank", "trial_id", "status"] and set(SPACE) <= set(header)
    assert all(r["trial_id"] != "?" for r in rows)
    for r in finished:
        assert (Path(cfg.output_dir) / "tune" / "trials" / r["trial_id"] / "train" / "final" / "adapter_model.safetensors").exists()


def test_importance_and_plots_are_finite(sweep):
    cfg, summary = sweep
    tune_dir = Path(cfg.output_dir) / "tune"
    for name in ("importance.png", "partial_dependence.png", "slice.png"):
        assert (tune_dir / name).read_bytes()[:4] == b"\x89PNG", name
    importance = json.loads((tune_dir / "importance.json").read_text())["importance"]
    assert set(importance) == set(SPACE) and all(math.isfinite(v) and v >= 0 for v in importance.values())
    curves = json.loads((tune_dir / "partial_dependence.json").read_text())["curves"]
    assert curves and all(math.isfinite(v) for c in curves.values() for v in c["mean_prediction"])


def test_sweep_and_its_trials_are_in_mlflow_and_the_winner_registered(sweep):
    from raylab import registry
    from raylab.evaluate import gates

    cfg, summary = sweep
    logged = summary["registry"]
    store = registry.open_store(cfg)
    parent = store.client.get_run(logged["run_id"])
    assert parent.data.tags["raylab.stage"] == "sweep" and logged["trials"] == 5
    children = store.client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_trial = {r.info.run_name.removeprefix("trial "): r for r in children}
    assert set(by_trial) == {r["trial_id"] for r in summary["results"]}
    for row in summary["results"]:  # one run per trial, its status and sampled params
        run = by_trial[row["trial_id"]]
        assert run.info.status == {"finished": "FINISHED", "stopped early": "KILLED", "error": "FAILED"}[row["status"]]
        assert float(run.data.params["train.lr"]) == pytest.approx(row["train.lr"])
        if row["status"] != "error":
            assert store.client.get_metric_history(run.info.run_id, "val_loss")
    mv = store.client.get_model_version(logged["name"], str(logged["version"]))
    assert mv.tags["raylab.stage"] == "tune" and mv.tags["raylab.trial_id"] == summary["best"]["trial_id"]
    assert mv.run_id == by_trial[summary["best"]["trial_id"]].info.run_id
    # its gates find the held-out split through the trial's manifest (the shards are the sweep's)
    checked = gates.evaluate_version(store, logged["name"], logged["version"])
    assert checked["status"] == "passed" and checked["val_loss"] == pytest.approx(summary["best"]["val_loss"], rel=1e-4)
    # the gate is an event of the sweep's run, beside its registration (not only the winning trial's)
    from raylab.core import events

    kinds = [(e["kind"], str(e["version"])) for e in events.read(runs.Run(cfg.output_dir).events)]
    v = str(logged["version"])
    assert ("registry.register", v) in kinds and ("registry.gate", v) in kinds, kinds
    assert kinds.index(("registry.register", v)) < kinds.index(("registry.gate", v))


def test_best_yaml_reproduces_the_winner(sweep):
    cfg, summary = sweep
    best_path = Path(summary["best"]["config"])
    best = config.load(best_path)
    assert best.tune is None and best.output_dir == cfg.output_dir
    assert best.train.lr == pytest.approx(summary["best"]["params"]["train.lr"])
    meta = train.run_train(best)
    assert meta["metrics"]["val_loss"] == pytest.approx(summary["best"]["val_loss"], abs=1e-6)


def test_killed_sweep_driver_resumes_with_finished_trials_kept(learn_data, tmp_path, capfd):
    cfg = sweep_config(learn_data, tmp_path / "run", num_samples=2, asha=None, points_to_evaluate=[],
                       search_space={"train.lr": {"loguniform": [1e-3, 2e-2]}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    trials = Path(cfg.output_dir) / "tune" / "trials"
    kill_cli_when_ready(["tune", str(path)], lambda: bool(list(trials.glob("*/train/final/" + runs.TRAIN_META))), timeout_s=400)
    first = {p.parts[-4] for p in trials.glob("*/train/final/" + runs.TRAIN_META)}
    assert first
    logs.console()  # raylab's lines on stdout, as the command prints them
    capfd.readouterr()
    with callers_sigint() as mine:
        summary = tune.run_tune(config.load(path))
        # Ray Tune's fit() installs its own SIGINT and SIGUSR1 handlers; the caller's are back
        assert signal.getsignal(signal.SIGINT) is mine
    assert summary["trials"] == 2 and summary["finished"] == 2
    assert first <= {r["trial_id"] for r in summary["results"]}  # the trials finished before the kill are kept
    # The console holds raylab's progress, not Ray Tune's experiment box, result path and
    # TensorBoard hint (Tune 2.60 prints those at verbose=0 too; sweep._tunes_own_output_off)
    out = capfd.readouterr().out
    assert "tune: 2 trials (" in out, out  # raylab's own start line: the capture works
    assert "Configuration for experiment" not in out and "View detailed results here" not in out, out


@pytest.mark.parametrize("space, expect", [
    ({"train.lrr": {"uniform": [0.1, 0.2]}}, r"unknown config keys \['train\.lrr'\]"),
    ({"train.lr": {"uniform": [0.2, 0.1]}}, r"range \[0\.2, 0\.1\] is empty"),
    ({"train.lr": {"choice": ["fast", "slow"]}}, r"tune\.search_space\.train\.lr: the value 'fast' does not make a valid config"),
    ({"model.lora.r": {"choice": [4, -8]}}, r"the value -8 does not make a valid config"),
])
def test_bad_search_space_is_exit_2_before_anything_runs(space, expect, tmp_path):
    raw = base_config(tmp_path / "run", tmp_path / "x.jsonl")
    raw["tune"] = {"search_space": space}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    from manifests import fake_manifest
    from raylab.models import build_byte_tokenizer, fingerprint

    (data / "manifest.json").write_text(json.dumps(fake_manifest(fingerprint(build_byte_tokenizer()), seq_len=128, rows=10, val_rows=2)))
    # In this process (conftest.cli_here): `python -m raylab tune` itself is the killed-driver test's
    r = cli_here("tune", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "tune").exists()  # refused before the sweep's directory (the sweep test's has study.db)
    import re

    assert re.search(expect, r.stderr), r.stderr


def test_budget_smaller_than_one_trial_is_refused(learn_data, tmp_path):
    cfg = sweep_config(learn_data, tmp_path / "run", max_total_steps=5)
    with pytest.raises(UserError, match=r"tune\.max_total_steps=5 is less than one trial \(16 steps\)"):
        tune.run_tune(cfg)
