"""`raylab train` on a config with a `pretrain` section whose base is not there yet: the
pretrain stage runs first (as `raylab run` would), instead of the command failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import with_data
from raylab import config, train
from raylab.core import events, runs
from raylab.train import pretrain

pytestmark = pytest.mark.integration


def test_train_pre_trains_first_when_the_base_is_missing(learn_data, tmp_path):
    raw = with_data(learn_data, tmp_path / "run", max_steps=2, eval_every=2, log_every=1).model_dump(mode="json")
    raw["pretrain"] = {"max_steps": 2, "batch_size": 4}
    cfg = config.load_dict(raw)
    assert pretrain.missing(cfg)
    meta = train.run_train(cfg)
    base = Path(pretrain.base_dir(cfg))
    assert not pretrain.missing(cfg) and (base / "config.json").exists()
    # the adapter was trained on the pre-trained base, not on the preset
    assert json.loads((Path(cfg.output_dir) / "train" / "final" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base)
    assert meta["steps"] == 2
    stages = [(e["kind"], e["fields"].get("stage")) for e in events.read(runs.Run(cfg.output_dir).events)
              if e["kind"].startswith("stage.")]
    assert stages == [("stage.start", "train"), ("stage.start", "pretrain"), ("stage.end", "pretrain"),
                      ("stage.end", "train")], stages
