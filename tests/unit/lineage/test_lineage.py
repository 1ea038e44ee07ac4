"""`raylab lineage` and `raylab erase` over a real control-plane database and MLflow store
(no Ray: the data runs are written to the index as the data stage writes them).

    pytest tests/unit/lineage/test_lineage.py
"""

from __future__ import annotations

import json

import pytest

from raylab import cli, registry
from raylab.core import audit, controldb, events, lineage, runs
from raylab.errors import UserError
from raylab.lineage import run_erase, run_lineage
from registry_helpers import open_test_store, register


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "_writer", lambda: None)  # this process appends (see tests/unit/core/conftest.py)
    monkeypatch.delenv("RAYLAB_DATABASE_URL", raising=False)
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    controldb.dispose_all()


def test_erase_marks_the_versions_trained_on_the_record_and_lineage_lists_them(home, monkeypatch):
    store = open_test_store(home, monkeypatch)
    lineage.index_run(str(home / "run"), "d1", "t1", [("docs", "a.jsonl:1"), ("docs", "a.jsonl:2")])  # META's data
    lineage.index_run(str(home / "other"), "d2", "t2", [("docs", "a.jsonl:2"), ("docs", "a.jsonl:3")])
    held, _ = register(store, home, 1), register(store, home, 2)  # both trained on d1
    registry.promote(store, "widgets", held)
    (home / "home" / "serve").mkdir(parents=True)
    runs.home().endpoint.write_text(json.dumps({"model": f"widgets/{held}", "url": "http://127.0.0.1:8000",
                                                "ref": "widgets@production", "tracking_uri": store.uri}))

    report = run_lineage(record_id="a.jsonl:1", store=store)
    assert [(d["run"], d["manifest_hash"]) for d in report["data_runs"]] == [(str(home / "run"), "d1")]
    assert [(v["name"], v["version"], v["aliases"]) for v in report["versions"]] == [("widgets", 1, ["production"]),
                                                                                     ("widgets", 2, [])]
    assert [(d["kind"], d["model"]) for d in report["deployments"]] == [("alias", "widgets/1"), ("endpoint", "widgets/1")]
    assert report["erased"] == []

    result = run_erase("a.jsonl:1", "GDPR art. 17, request 4411", source="docs", store=store)
    assert result["new"] and result["versions"] == result["marked"] == ["widgets/1", "widgets/2"]
    assert lineage.suppression().matches("docs", "a.jsonl:1")
    after = run_lineage(record_id="a.jsonl:1", store=store)
    assert all(v["erasure_pending"] == [str(result["entry"]["id"])] for v in after["versions"])
    assert [e["reason"] for e in after["erased"]] == ["GDPR art. 17, request 4411"]
    # a record only in data no version was trained on: no versions (negative control for the join)
    only_other = run_lineage(record_id="a.jsonl:3", store=store)
    assert [d["manifest_hash"] for d in only_other["data_runs"]] == ["d2"] and only_other["versions"] == []
    assert [v["version"] for v in run_lineage(record_id="a.jsonl:2", store=store)["versions"]] == [1, 2]
    assert run_lineage(source="docs", store=store)["data_runs"][0]["matched"] == 2

    again = run_erase("a.jsonl:1", "a second request", source="docs", store=store)
    assert not again["new"] and again["marked"] == []  # idempotent: the first entry stands, nothing re-tagged
    entries = list(audit.entries(audit.Settings.from_env(), audit.Filter(kinds=("data.erase",))))
    assert [e["fields"]["reason"] for e in entries] == ["GDPR art. 17, request 4411", "a second request"]
    assert entries[0]["fields"]["versions"] == ["widgets/1", "widgets/2"] and entries[0]["fields"]["source"] == "docs"


def test_user_errors_name_what_to_fix(home, monkeypatch, capsys):
    def code(*argv):
        rc = cli.main(list(argv))
        return rc, capsys.readouterr().err

    rc, err = code("lineage", "a.jsonl:1")
    assert rc == 2 and "no control-plane database at" in err and "RAYLAB_DATABASE_URL" in err
    assert "Traceback" not in err
    lineage.index_run("/runs/a", "h1", "t", [("docs", "a.jsonl:1")])
    rc, err = code("erase", "a.jsonl:99", "--reason", "request 1")
    assert rc == 2 and "record 'a.jsonl:99' is in no data run indexed" in err
    rc, err = code("lineage", "a.jsonl:1", "--source", "kb")
    assert rc == 2 and "in docs (fix --source)" in err
    rc, err = code("lineage")
    assert rc == 2 and "give a RECORD_ID" in err
    with pytest.raises(UserError, match="--reason"):
        run_erase("a.jsonl:1", "  ")
    assert len(lineage.suppression()) == 0  # nothing refused was recorded
    assert cli.main(["lineage", "--erased"]) == 0
    assert "the suppression list is empty" in capsys.readouterr().out
