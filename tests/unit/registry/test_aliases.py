"""Promotion rules, rollback and the alias history."""

from __future__ import annotations

import pytest

from raylab import registry
from raylab.errors import UserError
from registry_helpers import aliases, cfg_for, open_test_store, register


@pytest.fixture
def store(tmp_path, monkeypatch):
    return open_test_store(tmp_path, monkeypatch)


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


def test_registration_promotion_and_rollback_are_events(store, tmp_path):
    from raylab.core import events, runs

    v1, v2 = register(store, tmp_path, 1), register(store, tmp_path, 2)
    registry.promote(store, "widgets", v1)
    registry.promote(store, "widgets", v2)
    registry.rollback(store, "widgets", reason="answers regressed")
    with pytest.raises(UserError):  # a refused promotion changes nothing: no event
        registry.promote(store, "widgets", 9)
    recorded = [e for f in sorted((tmp_path / "home" / "events").glob("*.jsonl")) for e in events.read(str(f))]
    moves = [(e["kind"], e["model"], e["version"]) for e in recorded if e["kind"] != "registry.register"]
    assert moves == [("registry.promote", "widgets", str(v1)), ("registry.promote", "widgets", str(v2)),
                     ("registry.rollback", "widgets", str(v1))]
    assert [e["version"] for e in recorded if e["kind"] == "registry.register"] == [str(v1), str(v2)]
    # each lands in the run that produced the version too
    in_run = events.read(runs.Run(cfg_for(tmp_path).output_dir).events)
    assert {e["kind"] for e in in_run} == {"registry.register", "registry.promote", "registry.rollback"}
