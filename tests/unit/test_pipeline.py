"""`raylab run`'s argument errors and the Python API's config handling. The pipeline itself
runs end to end in tests/test_jobs.py (the cut-down quickstart as a Ray job on a two-node
cluster: data, train, gates, promote, serve, smoke requests, summary) and in full from
`make quickstart`."""

from __future__ import annotations

from conftest import REPO, run_cli


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


def test_a_run_that_would_serve_checks_the_api_keys_before_any_stage(tmp_path, capsys):
    from raylab import cli

    keys = tmp_path / "keys.txt"
    keys.write_text("\n# no key yet\n")
    proc_args = ["run", str(REPO / "configs" / "quickstart.yaml"), f"serve.api_keys_file={keys}",
                 f"output_dir={tmp_path / 'run'}"]
    assert cli.main(proc_args) == 2  # before Ray starts or the data stage reads anything
    err = capsys.readouterr().err
    assert f"raylab run: error: serve.api_keys_file: {keys} has no API key" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
