"""The lineage records in a real control-plane database, SQLite and PostgreSQL (started by the
test): the record index, the suppression list, the join from erased records to the data a
version was trained on, and the migration from a database that holds only the audit log.

    pytest tests/unit/core/test_lineage.py                                            # SQLite only
    pytest -m "integration or not integration" tests/unit/core/test_lineage.py        # and PostgreSQL
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from raylab.core import controldb, lineage
from raylab.errors import UserError


@pytest.fixture
def db(control_db):
    """A fresh control-plane database (tests/unit/core/conftest.py: SQLite and PostgreSQL)."""
    return control_db


def test_a_scoped_suppression_matches_its_source_only_and_any_source_matches_all(db):
    assert len(lineage.suppression()) == 0  # nothing recorded yet: an empty list, no database created
    entry, new = lineage.suppress("faq.csv:3", "faq", "request 1", "ada@host", ["widgets/1"])
    assert new and entry["id"] == 1 and entry["versions"] == ["widgets/1"]
    lineage.suppress("notes.jsonl:7", None, "request 2", "ada@host", [])
    s = lineage.suppression()
    assert s.matches("faq", "faq.csv:3") and not s.matches("kb", "faq.csv:3")  # negative control: other source
    assert s.matches("kb", "notes.jsonl:7") and s.matches("notes", "notes.jsonl:7")
    assert not s.matches("faq", "faq.csv:4")


def test_suppressing_again_keeps_the_first_entry_and_the_digest_tracks_the_list(db):
    before = lineage.suppression().digest
    first, _ = lineage.suppress("a.jsonl:1", "docs", "first request", "ada@host", [])
    after = lineage.suppression().digest
    again, new = lineage.suppress("a.jsonl:1", "docs", "second request", "bob@host", ["widgets/2"])
    assert not new and again["reason"] == "first request" and again["id"] == first["id"]
    assert before != after == lineage.suppression().digest  # the cache key moves only when the list does
    assert [e["record_id"] for e in lineage.erased()] == ["a.jsonl:1"]


def test_the_index_is_written_once_per_run_and_manifest_and_found_by_id_or_source(db):
    assert lineage.index_run("/runs/a", "h1", "t1", [("docs", "a.jsonl:1"), ("docs", "a.jsonl:2"), ("kb", "a.jsonl:1")])
    assert not lineage.index_run("/runs/a", "h1", "t1", [("docs", "a.jsonl:9")])  # a cache hit adds nothing
    assert lineage.index_run("/runs/a", "h2", "t2", [("docs", "a.jsonl:2")])      # the same dir, other data
    assert lineage.index_run("/runs/b", "h3", "t3", [("kb", "a.jsonl:1")])
    assert lineage.is_indexed("/runs/a", "h1") and not lineage.is_indexed("/runs/a", "h9")
    hits = lineage.runs_with(record_id="a.jsonl:1")
    assert [(h.run, h.manifest_hash, h.records) for h in hits] == [
        ("/runs/a", "h1", [("docs", "a.jsonl:1"), ("kb", "a.jsonl:1")]), ("/runs/b", "h3", [("kb", "a.jsonl:1")])]
    assert [h.manifest_hash for h in lineage.runs_with(record_id="a.jsonl:1", source="docs")] == ["h1"]
    assert [h.manifest_hash for h in lineage.runs_with(record_id="a.jsonl:2")] == ["h1", "h2"]
    assert [(h.manifest_hash, h.matched) for h in lineage.runs_with(source="kb")] == [("h1", 1), ("h3", 1)]
    assert lineage.runs_with(record_id="a.jsonl:9") == []
    assert lineage.sources_of("a.jsonl:1") == ["docs", "kb"]


def test_pending_for_joins_erased_records_to_the_data_that_held_them(db):
    lineage.index_run("/runs/a", "h1", "t", [("docs", "a.jsonl:1"), ("kb", "k.jsonl:5")])
    lineage.index_run("/runs/a", "h2", "t", [("docs", "a.jsonl:2")])
    assert lineage.pending_for("h1") == []  # negative control: nothing erased yet
    e1, _ = lineage.suppress("a.jsonl:1", "docs", "r", "ada@host", [])
    e2, _ = lineage.suppress("k.jsonl:5", None, "r", "ada@host", [])
    lineage.suppress("a.jsonl:1", "kb", "r", "ada@host", [])  # the same id in a source h1 did not read it from
    assert lineage.pending_for("h1") == [e1["id"], e2["id"]]
    assert lineage.pending_for("h2") == [] and lineage.pending_for("") == []


def test_readers_need_an_existing_database(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLAB_DATABASE_URL", f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(UserError, match="no control-plane database at"):
        lineage.runs_with(record_id="a.jsonl:1")
    assert lineage.erased() == [] and lineage.pending_for("h1") == []
    assert not (tmp_path / "none.db").exists()  # asking never creates one


def test_a_database_with_only_the_audit_log_is_migrated_and_keeps_its_entries(tmp_path, monkeypatch):
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    url = f"sqlite:///{tmp_path / 'old.db'}"
    eng = sa.create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(controldb.MIGRATIONS))
    with eng.begin() as conn:  # the schema as the first release of the control database left it
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001_audit_log")
        conn.execute(sa.text("insert into audit_log values (1, :p, :h, 't', 'stage.start', 'a', 'os-user', null, "
                             "null, null, '{}')"), {"p": "0" * 64, "h": "1" * 64})
    assert "data_runs" not in sa.inspect(eng).get_table_names()
    eng.dispose()
    monkeypatch.setenv("RAYLAB_DATABASE_URL", url)
    try:
        assert lineage.index_run("/runs/a", "h1", "t", [("docs", "a.jsonl:1")])
        with controldb.engine(url).connect() as conn:
            assert conn.execute(sa.text("select count(*) from audit_log")).scalar() == 1
            # migrated to the newest revision (lineage's 0002 and every later one)
            head = ScriptDirectory.from_config(cfg).get_current_head()
            assert conn.execute(sa.text("select version_num from raylab_alembic_version")).scalar() == head
        assert {"data_runs", "api_keys"} <= set(sa.inspect(controldb.engine(url)).get_table_names())
    finally:
        controldb.dispose_all()
