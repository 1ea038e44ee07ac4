"""`raylab run` end to end on an embedded local Ray (a subprocess, as a user runs it): the
quickstart config cut down by overrides (no sweep, a few steps, one worker) goes through
data, train, gates, promote, serve and smoke requests, and leaves its summary; the Python
API mirrors the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, free_port, run_cli

pytestmark = pytest.mark.integration


def test_raylab_run_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    done = run_cli("run", "configs/quickstart.yaml", f"output_dir={out}", "tune=null", "train.max_steps=6",
                   "train.epochs=1", "train.eval_every=3", "train.num_workers=1", "train.cpus_per_worker=1",
                   "registry.model_name=qs-e2e", f"serve.port={free_port()}", "eval.max_new_tokens=8", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert list(summary["stages"]) == ["data", "train", "gates", "promote", "serve", "smoke"]
    counts = summary["data"]
    assert counts["read"] == counts["accepted"] + counts["rejected"] + sum(counts["duplicates"].values())
    assert summary["version"]["name"] == "qs-e2e" and summary["gates"] == "passed"
    assert summary["promoted"] == f"qs-e2e/{summary['version']['version']}"
    assert summary["endpoint"]["version"] == summary["promoted"] and summary["endpoint"]["model"] == "qs-e2e"
    assert len(summary["smoke"]) >= 1 and all(isinstance(s["answer"], str) for s in summary["smoke"])
    assert "=== summary ===" in done.stdout and "endpoint: http://127.0.0.1:" in done.stdout
    # --until stops early and still writes the summary; an unknown stage is exit 2.
    again = run_cli("run", "configs/quickstart.yaml", f"output_dir={out}", "--until", "data", timeout=300)
    assert again.returncode == 0 and list(json.loads((out / "run.json").read_text())["stages"]) == ["data"]
    bad = run_cli("run", "configs/quickstart.yaml", "--until", "deploy", timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_python_api_mirrors_the_cli():
    import raylab

    cfg = raylab._config(REPO / "configs" / "quickstart.yaml", ["train.max_steps=3"])
    assert cfg.train.max_steps == 3 and cfg.registry.model_name == "acme-assistant"
    assert raylab._config(cfg.model_dump(mode="json"), ["train.lr=1e-4"]).train.lr == 1e-4
    for name in ("run", "run_data", "run_train", "run_tune", "run_eval", "start_serving", "stop_serving"):
        assert callable(getattr(raylab, name)) and name in raylab.__all__
    # The stage modules import without shadowing the API functions.
    from raylab import data, pipeline, train, tune  # noqa: F401

    assert callable(raylab.run) and raylab.run is not pipeline
