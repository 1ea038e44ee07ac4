"""`raylab run`'s optimize stage (pipeline.optimize_promoted) on a real Ray: the session's
trained adapter (`reference`) is registered from its run (so its resolved config, hence its
held-out split, travels with it), gated and promoted; the stage quantises the promoted version
(int8, merged onto float weights first), registers it derived from the parent, runs its gates
(the parent's: max_quality_drop passes, max_val_loss fails) and reports the failure in the
run summary, leaving the parent in production.

The optimize methods themselves are tested in tests/integration/test_prune.py,
test_distill.py and tests/unit/optimize; which runs reach this stage, in
tests/unit/test_pipeline.py."""

from __future__ import annotations

import logging

import pytest

from raylab import config, pipeline, registry
from raylab.optimize import QUANTIZED_TAG
from registry_helpers import open_test_store

pytestmark = pytest.mark.integration


def test_a_promoted_version_is_optimised_and_a_failed_gate_leaves_production_alone(reference, tmp_path, monkeypatch,
                                                                                   caplog):
    teacher_cfg, meta = reference
    store = open_test_store(tmp_path, monkeypatch)
    raw = teacher_cfg.model_dump(mode="json")
    raw["registry"]["model_name"] = "widgets"
    # Stored on the version at registration, carried onto the derived one: a quality drop it passes
    # (int8 moves a loss by far less than half) and a loss limit nothing this small reaches.
    raw["registry"]["gates"] = {"max_quality_drop": 0.5, "max_val_loss": 0.01}
    raw["optimize"] = {"quantize": "int8_weight_only", "measure": None}  # measurements: test_prune.py
    cfg = config.load_dict(raw)
    parent = registry.track_train(cfg, meta)  # the train stage's registration of the session's run
    assert parent["version"] == 1
    # the run's gates stage stands in here: the parent passed (its own gates are not the point)
    registry.set_tags(store, "widgets", 1, {"raylab.gates.status": "passed"})
    registry.promote(store, "widgets", 1, reason="test: gates passed")
    summary = {"promoted": "widgets/1"}

    with caplog.at_level(logging.INFO, logger="raylab"):
        (entry,) = pipeline.optimize_promoted(cfg, summary)
    assert summary["optimized"] == [entry]
    assert (entry["method"], entry["version"], entry["derived_from"]) == ("int8_weight_only", "widgets/2", "widgets/1")
    assert entry["gates"] == "failed" and entry["failures"] == ["max_val_loss"]  # max_quality_drop ran and passed
    assert entry["val_loss"] > 0.01

    mv = registry.get_version(store, "widgets/2")
    assert mv.tags["raylab.derived_from"] == "widgets/1" and mv.tags[QUANTIZED_TAG] == "int8_weight_only"
    assert mv.tags["raylab.gates.status"] == "failed" and "max_val_loss" in mv.tags["raylab.gates.failures"]
    report = registry.get_version(store, "widgets/2").tags["raylab.gates.report"]
    assert '"gate": "max_quality_drop"' in report and '"parent_val_loss"' in report  # measured against widgets/1
    # the failed derived version did not move production, nor is it promotable
    assert registry.get_version(store, "widgets@production").version in (1, "1")
    with pytest.raises(Exception, match="its gates are 'failed'"):
        registry.promote(store, "widgets", 2)
    assert "failed its gates (max_val_loss); production stays widgets/1" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raylab"):
        pipeline._print_summary(summary | {"stages": {"optimize": 1.0}, "audit": None})
    assert "optimized: widgets/2 = int8_weight_only of widgets/1 (gates: failed: max_val_loss failed; production " \
           "unchanged)" in caplog.text
