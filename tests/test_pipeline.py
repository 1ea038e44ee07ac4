"""`raylab run` end to end on the session's local Ray: the quickstart config cut down by
overrides (no sweep, a few steps, one worker) goes through data, train, gates, promote,
serve and smoke requests, and leaves its summary; the CLI's argument errors; the Python API
mirrors the CLI. (The full quickstart runs the same code from `make quickstart`.)"""

from __future__ import annotations

import json

import pytest

from conftest import REPO, free_port, run_cli

pytestmark = pytest.mark.integration


def test_raylab_run_quickstart_end_to_end(tmp_path, monkeypatch, _session_ray):
    from ray import serve

    from raylab import config, pipeline

    monkeypatch.chdir(REPO)  # the quickstart's relative paths, as `raylab run` from the repository root
    out = tmp_path / "qs"
    cfg = config.load("configs/quickstart.yaml", [
        f"output_dir={out}", "tune=null", "train.max_steps=6", "train.epochs=1", "train.eval_every=3",
        "train.num_workers=1", "train.cpus_per_worker=1", "registry.model_name=qs-e2e", f"serve.port={free_port()}",
        "eval.max_new_tokens=8", "data.dedup.near=false"])  # near-dedup shuffles are the data tests' subject
    lines: list[str] = []
    try:
        summary = pipeline.run(cfg, log=lambda *a: lines.append(" ".join(map(str, a))))
    finally:
        serve.shutdown()  # the next test module starts Serve with its own HTTP port
    assert summary == json.loads((out / "run.json").read_text())
    assert list(summary["stages"]) == ["data", "train", "gates", "promote", "serve", "smoke"]
    counts = summary["data"]
    assert counts["read"] == counts["accepted"] + counts["rejected"] + sum(counts["duplicates"].values())
    assert summary["version"]["name"] == "qs-e2e" and summary["gates"] == "passed"
    assert summary["promoted"] == f"qs-e2e/{summary['version']['version']}"
    assert summary["endpoint"]["version"] == summary["promoted"] and summary["endpoint"]["model"] == "qs-e2e"
    assert len(summary["smoke"]) >= 1 and all(isinstance(s["answer"], str) for s in summary["smoke"])
    text = "\n".join(lines)
    assert "=== summary ===" in text and "endpoint: http://127.0.0.1:" in text and "Q: " in text
    # --until stops early (the data stage's cache makes this quick) and still writes the summary.
    again = pipeline.run(cfg, until="data", log=lambda *a: None)
    assert list(again["stages"]) == ["data"] and json.loads((out / "run.json").read_text())["stages"] == again["stages"]


def test_raylab_run_cli_arguments():
    bad = run_cli("run", "configs/quickstart.yaml", "--until", "deploy", timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = run_cli("run", timeout=60)
    assert missing.returncode == 2 and "CONFIG file is required" in missing.stderr


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
