"""Run logging on a real MLflow store: idempotent, with lineage on the registered version; MLflow params."""

from __future__ import annotations

import json

import pytest

from raylab import registry
from registry_helpers import META, cfg_for, fake_final, open_test_store, register


@pytest.fixture
def store(tmp_path, monkeypatch):
    return open_test_store(tmp_path, monkeypatch)


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


def test_flatten_params():
    assert registry.flatten({"train": {"lr": 1e-3}, "data": {"sources": [{"path": "a"}]}, "x": [1, 2]}) == {
        "train.lr": "0.001", "data.sources.0.path": "a", "x": "[1, 2]"}
