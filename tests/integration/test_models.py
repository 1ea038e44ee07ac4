"""`raylab models`: the registry CLI. Each test's first command runs as `python -m raylab` in
a subprocess (each imports MLflow); the rest through the same entry point in this process
(conftest.cli_here: the same exit codes and output, without a Python start each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_here, run_cli
from registry_helpers import open_test_store, register


@pytest.fixture
def store(tmp_path, monkeypatch):
    return open_test_store(tmp_path, monkeypatch)


@pytest.mark.integration  # subprocesses: each imports MLflow
def test_models_cli_lists_and_refuses_with_exit_2(store, tmp_path):
    register(store, tmp_path, 1)
    env = {"RAYLAB_HOME": str(tmp_path / "home")}
    listed = run_cli("models", "list", env=env)
    assert listed.returncode == 0 and "widgets" in listed.stdout and "passed" in listed.stdout, listed.stderr
    shown = cli_here("models", "show", "widgets/1", env=env)
    assert shown.returncode == 0 and "data_manifest_hash: d1" in shown.stdout, shown.stderr
    # --json: the same facts for scripts, parseable as a whole
    rows = json.loads(cli_here("models", "list", "--json", env=env).stdout)
    assert [(r["name"], r["version"], r["gates"]) for r in rows] == [("widgets", 1, "passed")]
    version = json.loads(cli_here("models", "show", "widgets/1", "--json", env=env).stdout)
    assert version["name"] == "widgets" and version["version"] == 1 and version["tags"]["data_manifest_hash"] == "d1"
    assert version["checksums"] and all(len(v) == 64 for v in version["checksums"].values())
    for args, message in [(["show", "widgets@staging"], "no alias 'staging'"), (["promote", "widgets", "7"], "no version 7"),
                          (["rollback", "nope"], "no registered model 'nope'")]:
        out = cli_here("models", *args, env=env)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.integration  # subprocesses: each imports MLflow
def test_a_version_missing_a_file_or_its_checksums_is_refused_with_exit_2(store, tmp_path):
    env = {"RAYLAB_HOME": str(tmp_path / "home")}
    for n in (1, 2, 3):
        register(store, tmp_path, n)
    ok = run_cli("export", "widgets/1", str(tmp_path / "out1"), env=env)  # control: an intact version exports
    assert ok.returncode == 0 and (tmp_path / "out1" / "adapter_model.safetensors").exists(), ok.stderr
    (Path(store.client.get_model_version("widgets", "2").source) / "tokenizer.json").unlink()
    store.client.delete_model_version_tag("widgets", "3", "raylab.checksums")
    for version, message in [(2, "widgets/2: artifact does not match its registration checksums: tokenizer.json (missing)"),
                             (3, "widgets/3: no checksums recorded at registration; refusing to load it unverified")]:
        out = cli_here("export", f"widgets/{version}", str(tmp_path / f"out{version}"), env=env)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert not (tmp_path / f"out{version}").exists()  # nothing written from an unverified version
