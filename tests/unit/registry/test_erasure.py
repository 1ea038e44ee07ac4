"""The erasure gate: a version tagged erasure_pending is refused by promote unless forced with
a reason, and the override is audited; a version registered from data that holds an erased
record starts tagged.

    pytest tests/unit/registry/test_erasure.py
"""

from __future__ import annotations

import pytest

from raylab import registry
from raylab.core import audit, controldb, events, lineage
from raylab.errors import UserError
from registry_helpers import META, aliases, cfg_for, fake_final, open_test_store, register


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "_writer", lambda: None)  # this process appends (see tests/unit/core/conftest.py)
    monkeypatch.delenv("RAYLAB_DATABASE_URL", raising=False)  # $RAYLAB_HOME/raylab.db, under tmp_path
    yield open_test_store(tmp_path, monkeypatch)
    controldb.dispose_all()


def test_a_pending_erasure_blocks_promotion_until_forced_with_a_reason(store, tmp_path):
    clean, held = register(store, tmp_path, 1), register(store, tmp_path, 2)
    mv = registry.get_version(store, f"widgets/{held}")
    assert registry.mark_erasure_pending(store, mv, [7], reason="record a.jsonl:3 erased")
    assert not registry.mark_erasure_pending(store, registry.get_version(store, f"widgets/{held}"), [7])  # once
    assert registry.erasures_pending(registry.get_version(store, f"widgets/{held}")) == ["7"]

    registry.promote(store, "widgets", clean)  # negative control: gates passed, nothing erased
    with pytest.raises(UserError, match="erasure_pending .*suppression entries 7.*--force --reason"):
        registry.promote(store, "widgets", held)  # its gates passed: the erasure alone refuses it
    with pytest.raises(UserError, match="--force needs --reason"):
        registry.promote(store, "widgets", held, force=True)
    assert aliases(store) == {"production": clean}
    registry.promote(store, "widgets", held, force=True, reason="legal hold: keep serving until retrained")
    assert aliases(store) == {"production": held, "previous": clean}

    last = registry.alias_history(store, "widgets")[-1]
    assert last["forced"] and last["reason"] == "legal hold: keep serving until retrained"
    settings = audit.Settings.from_env()
    promotes = [e for e in audit.entries(settings, audit.Filter(kinds=("registry.promote",)))]
    assert "overrode" not in promotes[0]["fields"]  # the clean promotion overrode nothing
    assert promotes[-1]["fields"]["overrode"] == ["erasure_pending"] and promotes[-1]["fields"]["erasures"] == ["7"]
    assert promotes[-1]["fields"]["moves"][-1]["reason"] == "legal hold: keep serving until retrained"
    marks = list(audit.entries(settings, audit.Filter(kinds=("registry.erasure_pending",))))
    assert [(e["model"], e["version"], e["fields"]["erasures"]) for e in marks] == [("widgets", str(held), [7])]
    assert audit.verify(settings).ok


def test_versions_are_found_by_their_data_and_start_pending_when_it_holds_an_erased_record(store, tmp_path):
    lineage.index_run(str(tmp_path / "run"), "d1", "t", [("docs", "a.jsonl:1")])
    v1 = register(store, tmp_path, 1)  # before the erasure: nothing pending yet
    assert registry.erasures_pending(registry.get_version(store, f"widgets/{v1}")) == []
    entry, _ = lineage.suppress("a.jsonl:1", "docs", "request 9", "ada@host", [])
    cfg = cfg_for(tmp_path)
    run_id = registry.log_run(store, registry.experiment_id(store, "widgets"), name="r2", key="k2", params={},
                              history=[], artifacts={}, tags={})
    later = registry.register(store, cfg, run_id, str(fake_final(tmp_path, "final2")), META)  # same data d1
    assert registry.erasures_pending(later) == [str(entry["id"])]
    run_id = registry.log_run(store, registry.experiment_id(store, "widgets"), name="r3", key="k3", params={},
                              history=[], artifacts={}, tags={})
    clean = registry.register(store, cfg, run_id, str(fake_final(tmp_path, "final3")), META | {"data_manifest_hash": "d2"})
    assert registry.erasures_pending(clean) == []  # negative control: other data
    # versions are found by the data they were trained on (one store for both checks: each costs seconds)
    assert [int(mv.version) for mv in registry.trained_on(store, ["d1"])] == [v1, int(later.version)]
    assert [int(mv.version) for mv in registry.trained_on(store, ["d2"])] == [int(clean.version)]
    assert registry.trained_on(store, ["nothing", "x' or '1'='1"]) == []
    registry.set_tags(store, "widgets", int(later.version), {"raylab.gates.status": "passed"})
    with pytest.raises(UserError, match="erasure_pending"):
        registry.promote(store, "widgets", int(later.version))
