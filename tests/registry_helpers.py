"""Registry test helpers: a real MLflow store (SQLite in a temporary directory), registered
versions made from fake final/ directories (the registry treats model files opaquely)."""

from __future__ import annotations

import json
from pathlib import Path

from raylab import config, registry


def open_test_store(tmp_path, monkeypatch):
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
        "steps": 24, "world_size": 1, "dtype": "float32", "precision": "float32", "metrics": {"val_loss": 2.5}}


def register(store, tmp_path, n: int, gates: str = "passed", final: Path | None = None):
    """Version n of `widgets` from a fake final/ directory (or from `final`, a real model)."""
    cfg = cfg_for(tmp_path)
    exp = registry.experiment_id(store, "widgets")
    run_id = registry.log_run(store, exp, name=f"r{n}", key=f"k{n}", params={"train.lr": "0.001"},
                              history=[{"step": 0, "val_loss": 3.0}, {"step": 4, "loss": 2.8, "val_loss": 2.5}],
                              artifacts={}, tags={})
    mv = registry.register(store, cfg, run_id, str(final or fake_final(tmp_path, f"final{n}")), META)
    registry.set_tags(store, "widgets", int(mv.version), {"raylab.gates.status": gates})
    return int(mv.version)


def aliases(store) -> dict[str, int]:
    return {a: int(v) for a, v in store.client.get_registered_model("widgets").aliases.items()}


