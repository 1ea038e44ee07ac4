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


# ---------------------------------------------------------------- sealed record ids (governance.encryption)

PERSONAL = "sql:ada.lovelace@example.com"  # an SQL key that is personal data


@pytest.fixture
def sealing(tmp_path, monkeypatch):
    """Encryption on with a local key ring in tmp_path; the user's default ring is out of reach
    (XDG_CONFIG_HOME in tmp_path), so a process without the settings cannot open the ids."""
    from raylab.core import crypto

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nobody"))
    settings = crypto.Settings("local", key_file=str(tmp_path / "keys" / "ring.json"))
    monkeypatch.setenv(crypto.ENV, settings.to_env())
    crypto._deks.clear()
    yield settings
    crypto._deks.clear()


def _stored_ids(url: str) -> list[str]:
    eng = sa.create_engine(controldb.normalise(url))
    with eng.connect() as conn:
        ids = [r[0] for r in conn.execute(sa.text("select record_id from record_index"))]
        ids += [r[0] for r in conn.execute(sa.text("select record_id from suppressions"))]
    eng.dispose()
    return ids


def test_with_encryption_on_ids_are_sealed_at_rest_and_every_lookup_still_works(db, sealing):
    lineage.index_run("/runs/a", "h1", "t", [("crm", PERSONAL), ("crm", "sql:grace@example.com"), ("kb", PERSONAL)])
    lineage.index_run("/runs/b", "h2", "t", [("crm", "sql:grace@example.com")])
    entry, _ = lineage.suppress(PERSONAL, "crm", "request 9", "ada@host", ["crm/1"])
    stored = _stored_ids(db)
    assert len(stored) == 5 and all(s.startswith(lineage.SEALED) for s in stored)
    assert not any("example.com" in s for s in stored)
    assert lineage.as_recorded(PERSONAL) in stored and lineage.as_recorded(PERSONAL) != PERSONAL
    hits = lineage.runs_with(record_id=PERSONAL)
    assert [(h.run, sorted(h.records)) for h in hits] == [("/runs/a", [("crm", PERSONAL), ("kb", PERSONAL)])]
    assert [h.manifest_hash for h in lineage.runs_with(source="crm")] == ["h1", "h2"]
    assert lineage.sources_of(PERSONAL) == ["crm", "kb"]
    assert entry["record_id"] == PERSONAL and lineage.erased()[0]["record_id"] == PERSONAL
    s = lineage.suppression()
    assert s.matches("crm", PERSONAL) and not s.matches("kb", PERSONAL)  # the data stage gets plain ids
    assert lineage.pending_for("h1") == [entry["id"]] and lineage.pending_for("h2") == []  # the join, sealed


def test_plain_control_without_encryption_the_same_scan_finds_the_ids(db, monkeypatch):
    from raylab.core import crypto

    monkeypatch.delenv(crypto.ENV, raising=False)
    lineage.index_run("/runs/a", "h1", "t", [("crm", PERSONAL)])
    lineage.suppress(PERSONAL, "crm", "request 9", "ada@host", [])
    assert _stored_ids(db) == [PERSONAL, PERSONAL] and lineage.as_recorded(PERSONAL) == PERSONAL


def test_turning_encryption_on_seals_the_ids_already_there(db, sealing, monkeypatch):
    from raylab.core import crypto

    monkeypatch.delenv(crypto.ENV)
    lineage.index_run("/runs/a", "h1", "t", [("crm", PERSONAL)])
    before, _ = lineage.suppress(PERSONAL, None, "request 1", "ada@host", [])
    monkeypatch.setenv(crypto.ENV, sealing.to_env())
    lineage.index_run("/runs/b", "h2", "t", [("crm", PERSONAL)])  # the first encrypting run makes the key
    assert not any("example.com" in s for s in _stored_ids(db))
    assert [h.run for h in lineage.runs_with(record_id=PERSONAL)] == ["/runs/a", "/runs/b"]  # one form: both found
    assert lineage.pending_for("h1") == lineage.pending_for("h2") == [before["id"]]
    again, new = lineage.suppress(PERSONAL, None, "request 2", "bob@host", [])
    assert not new and again["id"] == before["id"]  # the sealed entry is the same entry


def test_without_the_key_lookups_stop_naming_the_key_and_rotation_rewraps_it(db, sealing, monkeypatch):
    from raylab.core import crypto

    lineage.index_run("/runs/a", "h1", "t", [("crm", PERSONAL)])
    ring = crypto.provider(sealing)
    old = ring.active_id()
    monkeypatch.delenv(crypto.ENV)  # a process that was not given the config's keys
    crypto._deks.clear()
    with pytest.raises(UserError, match=f"record ids: encrypted with key {old}.*--config"):
        lineage.runs_with(record_id=PERSONAL)
    monkeypatch.setenv(crypto.ENV, sealing.to_env())
    new = ring.rotate()
    assert lineage.rewrap_key(sealing) == new
    ring.retire(keep=new)
    crypto._deks.clear()
    assert [h.run for h in lineage.runs_with(record_id=PERSONAL)] == ["/runs/a"]  # opened by the new key alone
