"""Live tracking on a real Ray Train run (the shared data-stage output): the run's MLflow run
exists and holds training metrics while the run is still going, seen from a Ray Train callback
after an evaluation (the callback holds Ray Train's controller, so the run cannot end while it
looks); at the end it is the same run, FINISHED, with every metrics.jsonl step once, system
metrics, and the registered version carrying the dtype the workers used."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from conftest import base_config
from raylab import config, train

pytestmark = pytest.mark.integration

NAME = "live-widgets"


def test_metrics_reach_mlflow_while_the_run_goes(learn_data, tmp_path):
    import ray.train
    from mlflow import MlflowClient

    corpus, reference = learn_data
    out = tmp_path / "live"
    shutil.copytree(reference / "data", out / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    raw = base_config(out, corpus, max_steps=8, eval_every=4, log_every=2)  # the run's length is not the point
    raw["registry"] = {"tracking_uri": uri, "model_name": NAME, "live_interval_s": 0.2, "system_metrics": True}
    cfg = config.load_dict(raw)
    seen_file = tmp_path / "seen.json"

    class Watch(ray.train.UserCallback):
        """After the first evaluation past step 0: what MLflow holds now (in the controller)."""

        def __init__(self, uri: str, output_dir: str, seen: str):
            self.uri, self.output_dir, self.seen = uri, output_dir, seen

        def after_report(self, run_context, metrics, checkpoint):
            step = metrics[0].get("step", 0)
            if step == 0 or os.path.exists(self.seen):
                return
            client = MlflowClient(self.uri)
            found = {"timeout": True, "report_step": step}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                exp = client.get_experiment_by_name(NAME)
                runs = client.search_runs([exp.experiment_id], f"tags.`raylab.output_dir` = '{self.output_dir}'") if exp else []
                losses = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] if runs else []
                if losses:
                    found = {"run_id": runs[0].info.run_id, "status": runs[0].info.status, "loss_steps": losses,
                             "report_step": step}
                    break
                time.sleep(0.2)
            with open(self.seen, "w") as f:
                json.dump(found, f)

    meta = train.run_train(cfg, callbacks=[Watch(uri, cfg.output_dir, str(seen_file))])
    seen = json.loads(seen_file.read_text())
    assert "timeout" not in seen, seen
    assert seen["status"] == "RUNNING" and seen["report_step"] < meta["steps"], seen
    # Loss rows were in MLflow while the run was RUNNING. How many depends on timing (the
    # controller sees a report after the workers have moved on), so only their presence counts.
    assert seen["loss_steps"] and all(0 < s <= meta["steps"] for s in seen["loss_steps"]), seen

    client = MlflowClient(uri)
    run = client.get_run(seen["run_id"])
    assert meta["registry"]["run_id"] == run.info.run_id  # the live run is the run logged at the end
    assert run.info.status == "FINISHED"
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [r["step"] for r in rows if r.get("loss") is not None]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [r["step"] for r in rows
                                                                                  if r.get("evaluated") is not False]
    assert run.info.start_time <= rows[0]["time"] * 1000  # opened before the baseline evaluation
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    assert len(client.search_runs([client.get_experiment_by_name(NAME).experiment_id])) == 1
    version = client.get_model_version(NAME, str(meta["registry"]["version"]))
    assert (version.tags["dtype"], version.tags["precision"]) == ("float32", "float32")  # CPU workers, model.dtype auto
    assert (meta["dtype"], meta["precision"]) == ("float32", "float32")
