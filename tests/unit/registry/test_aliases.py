"""Promotion rules, rollback and the alias history."""

from __future__ import annotations

import pytest

from raylab import registry
from raylab.errors import UserError
from registry_helpers import aliases, open_test_store, register


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
