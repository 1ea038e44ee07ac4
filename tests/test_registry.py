"""Registry logic on a real MLflow (SQLite store in a temporary directory), without Ray:
where the store is, idempotent run logging, registration with lineage and checksums, the
integrity check, promotion rules, rollback and the alias history. The evaluation scores are
here too. The train/tune/eval integration is in test_eval.py and test_tune.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from raylab import config, evaluate, registry
from raylab.errors import UserError


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return registry.open_store()


def cfg_for(tmp_path: Path, **registry_section) -> config.RaylabConfig:
    return config.load_dict({
        "version": 1, "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
        "model": {"name_or_path": "preset:tiny-llama"},
        "registry": {"model_name": "widgets", **registry_section},
    })


def fake_final(tmp_path: Path, name: str) -> Path:
    """A final/ directory as the train stage writes it (the registry treats files opaquely)."""
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    (d / "tokenizer.json").write_text("{}")
    return d


META = {"identity": "abc", "base_model": "preset:tiny-llama", "method": "lora", "data_manifest_hash": "d1",
        "config_hash": "c1", "code_version": "raylab test", "trained_tokens": 1234, "estimated_training_flops": 5.5e9,
        "steps": 24, "world_size": 1, "metrics": {"val_loss": 2.5}}


def register(store, tmp_path, n: int, gates: str = "passed"):
    cfg = cfg_for(tmp_path)
    exp = registry.experiment_id(store, "widgets")
    run_id = registry.log_run(store, exp, name=f"r{n}", key=f"k{n}", params={"train.lr": "0.001"},
                              history=[{"step": 0, "val_loss": 3.0}, {"step": 4, "loss": 2.8, "val_loss": 2.5}],
                              artifacts={}, tags={})
    mv = registry.register(store, cfg, run_id, str(fake_final(tmp_path, f"final{n}")), META)
    registry.set_tags(store, "widgets", int(mv.version), {"raylab.gates.status": gates})
    return int(mv.version)


def aliases(store) -> dict[str, int]:
    return {a: int(v) for a, v in store.client.get_registered_model("widgets").aliases.items()}


def test_store_location_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert registry.locate() == (f"sqlite:///{tmp_path}/home/mlflow/mlflow.db", f"{tmp_path}/home/mlflow/artifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/team/m.db")
    assert registry.locate() == (f"sqlite:///{tmp_path}/team/m.db", f"{tmp_path}/team/artifacts")
    assert registry.locate("http://mlflow.internal:5000") == ("http://mlflow.internal:5000", None)


def test_unreachable_tracking_server_is_a_user_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(UserError, match=r"registry.tracking_uri http://127.0.0.1:\d+: MLflow server not reachable"):
        registry.open_store(cfg_for(tmp_path, tracking_uri=f"http://127.0.0.1:{port}"))
    with pytest.raises(UserError, match="not a tracking URI"):
        registry.open_store(tracking_uri="ftp://x")


def test_run_logging_is_idempotent_and_registration_carries_lineage(store, tmp_path):
    exp = registry.experiment_id(store, "widgets")
    history = [{"step": 0, "val_loss": 3.0, "evaluated": True}, {"step": 4, "loss": 2.8, "val_loss": 2.5, "lr": 1e-3}]
    a = registry.log_run(store, exp, name="r", key="same", params={"train.lr": "0.001"}, history=history, artifacts={}, tags={})
    b = registry.log_run(store, exp, name="r", key="same", params={"train.lr": "0.001"}, history=history, artifacts={}, tags={})
    assert a == b
    run = store.client.get_run(a)
    assert run.data.params["train.lr"] == "0.001"
    assert [m.step for m in store.client.get_metric_history(a, "val_loss")] == [0, 4]
    assert "evaluated" not in run.data.metrics  # booleans are flags, not metrics

    mv = registry.register(store, cfg_for(tmp_path), a, str(fake_final(tmp_path, "final")), META)
    assert int(mv.version) == 1 and mv.run_id == a
    for key in registry.LINEAGE:
        assert mv.tags[key] == str(META[key])
    assert json.loads(mv.tags["raylab.checksums"]).keys() == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}
    assert mv.tags["raylab.gates.status"] == "pending"
    assert int(registry.register(store, cfg_for(tmp_path), a, str(tmp_path / "final"), META).version) == 1  # same run
    assert register(store, tmp_path, 2) == 2  # the next run is the next version


def test_fetch_verifies_checksums_and_refuses_tampering(store, tmp_path):
    v = register(store, tmp_path, 1)
    local = Path(registry.fetch(store, f"widgets/{v}"))
    assert (local / "adapter_model.safetensors").read_bytes() == b"\x00weights" * 100
    source = Path(store.client.get_model_version("widgets", str(v)).source)
    (source / "adapter_model.safetensors").write_bytes(b"\x00evil" * 100)
    with pytest.raises(registry.IntegrityError, match="adapter_model.safetensors .*sha256"):
        registry.fetch(store, f"widgets/{v}")
    (source / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    (source / "extra.py").write_text("import os")
    with pytest.raises(registry.IntegrityError, match="extra.py \\(not registered\\)"):
        registry.fetch(store, f"widgets/{v}")


def test_refs_name_what_is_missing(store, tmp_path):
    register(store, tmp_path, 1)
    for ref, message in [("nope/1", "no registered model 'nope'.*known: widgets"),
                         ("widgets/9", r"no version 9 \(versions: \[1\]\)"),
                         ("widgets@production", "no alias 'production'.*raylab models promote widgets"),
                         ("widgets", "expected NAME/VERSION")]:
        with pytest.raises(UserError, match=message):
            registry.get_version(store, ref)


def test_promotion_needs_passed_gates_and_rollback_walks_back(store, tmp_path):
    v1, v2, v3 = register(store, tmp_path, 1), register(store, tmp_path, 2), register(store, tmp_path, 3, gates="failed")
    registry.promote(store, "widgets", v1)
    registry.promote(store, "widgets", v2)
    assert aliases(store) == {"production": v2, "previous": v1}
    with pytest.raises(UserError, match="may not be promoted: its gates are 'failed'"):
        registry.promote(store, "widgets", v3)
    with pytest.raises(UserError, match="--force needs --reason"):
        registry.promote(store, "widgets", v3, force=True)
    registry.promote(store, "widgets", v3, force=True, reason="hotfix for ticket 42")
    assert aliases(store) == {"production": v3, "previous": v2}

    registry.rollback(store, "widgets", reason="answers regressed")
    assert aliases(store) == {"production": v2, "previous": v1}
    registry.rollback(store, "widgets")
    assert aliases(store) == {"production": v1}
    with pytest.raises(UserError, match="no previous production version"):
        registry.rollback(store, "widgets")

    history = registry.alias_history(store, "widgets")
    production = [(h["from"], h["to"]) for h in history if h["alias"] == "production"]
    assert production == [(None, v1), (v1, v2), (v2, v3), (v3, v2), (v2, v1)]
    forced = [h for h in history if h["forced"]]
    assert len(forced) == 1 and forced[0]["reason"] == "hotfix for ticket 42" and forced[0]["user"]
    assert any("answers regressed" in h["reason"] for h in history)
    assert all(h["time"].endswith("Z") for h in history)


@pytest.mark.integration  # subprocesses: each imports MLflow
def test_models_cli_lists_and_refuses_with_exit_2(store, tmp_path):
    register(store, tmp_path, 1)
    env = {"RAYLAB_HOME": str(tmp_path / "home")}
    listed = run_cli("models", "list", env=env)
    assert listed.returncode == 0 and "widgets" in listed.stdout and "passed" in listed.stdout, listed.stderr
    shown = run_cli("models", "show", "widgets/1", env=env)
    assert shown.returncode == 0 and "data_manifest_hash: d1" in shown.stdout, shown.stderr
    for args, message in [(["show", "widgets@staging"], "no alias 'staging'"), (["promote", "widgets", "7"], "no version 7"),
                          (["rollback", "nope"], "no registered model 'nope'")]:
        out = run_cli("models", *args, env=env)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize(("prediction", "reference", "em", "rouge"), [
    ("The red widget ships today.", "the red widget ships today", True, 1.0),
    ("The blue widget ships today.", "The red widget ships today.", False, 0.8),
    ("", "anything", False, 0.0),
    ("red", "", False, 0.0),
])
def test_scores(prediction, reference, em, rouge):
    assert evaluate.exact_match(prediction, reference) is em
    assert evaluate.rouge_l(prediction, reference) == pytest.approx(rouge)


def test_flatten_params():
    assert registry.flatten({"train": {"lr": 1e-3}, "data": {"sources": [{"path": "a"}]}, "x": [1, 2]}) == {
        "train.lr": "0.001", "data.sources.0.path": "a", "x": "[1, 2]"}
