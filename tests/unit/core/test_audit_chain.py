"""The audit chain on a real database, SQLite and PostgreSQL (started by the test): each kind
of tampering is caught and the first bad entry named, an untouched chain verifies (the
negative control of each), and 8 processes appending at once leave one valid chain.

    pytest tests/unit/core/test_audit_chain.py                         # SQLite only
    pytest -m "integration or not integration" tests/unit/core/test_audit_chain.py   # and PostgreSQL
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from raylab.core import audit, controldb, events, runs, storage
from raylab.core.audit import chain, check, keys

REPO = Path(__file__).resolve().parents[3]
N = 6


@pytest.fixture
def db(control_db, tmp_path, monkeypatch):
    """A fresh control-plane database (tests/unit/core/conftest.py: SQLite and PostgreSQL)
    with this test's own home, signing key, checkpoints and user."""
    url = control_db
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    monkeypatch.setenv("RAYLAB_AUDIT_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("RAYLAB_USER", "ada")
    return url


def settings() -> audit.Settings:
    return audit.Settings.from_env()


def fill(n: int = N) -> None:
    for i in range(n):
        events.emit("registry.promote" if i % 2 else "stage.end", model="acme", version=i + 1, step=i, loss=0.5 / (i + 1))


def sql(statement: str, **params) -> None:
    eng = controldb.engine(settings().database)
    with eng.begin() as conn:
        conn.execute(sa.text(statement), params)


def first(report: check.Report) -> tuple[int, str]:
    assert not report.ok, "tampering went unnoticed"
    return report.problems[0].entry, report.problems[0].reason


def untouched_verifies() -> None:
    report = audit.verify(settings())
    assert report.ok, report.problems
    assert report.entries == report.latest_checkpoint and report.unsigned_tail == 0


def test_an_untouched_chain_verifies(db):
    fill()
    report = audit.verify(settings())
    assert report.ok and report.entries == N and report.checkpoints == N
    stored = list(audit.entries(settings()))
    assert [e["seq"] for e in stored] == list(range(1, N + 1))
    assert stored[0]["prev"] == chain.GENESIS and all(b["prev"] == a["hash"] for a, b in zip(stored, stored[1:], strict=False))
    assert stored[0]["actor"].startswith("ada@") and stored[0]["actor_kind"] == "os-user"


def test_an_edited_field_is_named(db):
    fill()
    untouched_verifies()
    sql("update audit_log set actor = 'mallory@evil' where seq = 3")
    assert first(audit.verify(settings())) == (3, "edited")


def test_an_edited_fields_value_is_named(db):
    fill()
    untouched_verifies()
    sql("update audit_log set fields = replace(fields, :a, :b) where seq = 5", a='"step":4', b='"step":40')
    assert first(audit.verify(settings())) == (5, "edited")


def test_a_deleted_entry_is_named(db):
    fill()
    untouched_verifies()
    sql("delete from audit_log where seq = 3")
    report = audit.verify(settings())
    assert first(report) == (3, "deleted")
    assert "entry 3 deleted" in report.problems[0].message


def test_swapped_entries_are_named(db):
    fill()
    untouched_verifies()
    for a, b in ((3, -1), (4, 3), (-1, 4)):  # swap the positions of entries 3 and 4
        sql("update audit_log set seq = :b where seq = :a", a=a, b=b)
    assert first(audit.verify(settings())) == (3, "reordered")


def test_a_truncated_tail_is_named_with_its_checkpoint(db):
    fill()
    untouched_verifies()
    sql("delete from audit_log where seq > 4")
    report = audit.verify(settings())
    assert first(report) == (5, "truncated")
    assert f"truncated since checkpoint {N}" in report.problems[0].message


def _forge_from(seq: int) -> None:
    """What a forger with write access to the database but not the key can do: change an
    entry, then recompute every hash and link after it, so the chain is consistent again."""
    eng = controldb.engine(settings().database)
    with eng.begin() as conn:
        rows = list(conn.execute(sa.select(chain.audit_log).order_by(chain.audit_log.c.seq)))
        prev = rows[seq - 2].hash if seq > 1 else chain.GENESIS
        for row in rows[seq - 1:]:
            body = chain.body_of(row)
            body["prev"] = prev
            if row.seq == seq:
                body["actor"] = "mallory@evil"
            new = chain.entry_hash(body)
            conn.execute(sa.update(chain.audit_log).where(chain.audit_log.c.seq == row.seq)
                         .values(prev_hash="tmp" + str(row.seq), hash="tmph" + str(row.seq)))
            conn.execute(sa.update(chain.audit_log).where(chain.audit_log.c.seq == row.seq)
                         .values(prev_hash=prev, hash=new, actor=body["actor"]))
            prev = new


def test_a_consistent_forged_chain_is_caught_by_the_checkpoints(db):
    fill()
    untouched_verifies()
    _forge_from(3)
    report = audit.verify(settings())
    assert [p.reason for p in report.problems] == ["rewritten"]  # every link holds: only the signature tells
    assert first(report) == (3, "rewritten")


def test_a_forger_signing_new_checkpoints_with_their_own_key_is_caught(db, tmp_path):
    fill()
    untouched_verifies()
    _forge_from(2)
    forger_key = str(tmp_path / "forger" / "key.pem")
    keys.ensure_key(forger_key)
    for row in chain.rows(settings())[1:]:  # re-sign what changed, over the true checkpoints
        keys.write_checkpoint(settings().checkpoints, forger_key, row.seq, row.hash)
    report = audit.verify(settings())
    assert first(report) == (2, "forged-checkpoint")
    assert {p.reason for p in report.problems} == {"forged-checkpoint"}
    assert report.latest_checkpoint == 1  # only the untouched first checkpoint still counts


def test_deleted_checkpoints_leave_the_chain_unproven(db):
    fill()
    untouched_verifies()
    storage.remove_dir(settings().checkpoints)
    assert first(audit.verify(settings())) == (1, "unsigned")


def test_two_databases_keep_their_own_default_checkpoints(tmp_path, monkeypatch):
    """A second database under one $RAYLAB_HOME (another project's governance.database) gets a
    checkpoint directory of its own by default. The control: a third chain pointed at the
    default's directory overwrites checkpoints 1 and 2, and the default chain reads as rewritten."""
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    monkeypatch.setenv("RAYLAB_USER", "ada")
    monkeypatch.delenv("RAYLAB_AUDIT_CHECKPOINTS", raising=False)
    monkeypatch.delenv("RAYLAB_DATABASE_URL", raising=False)

    def chain_in(url: str, n: int) -> audit.Settings:
        monkeypatch.setenv("RAYLAB_DATABASE_URL", url)
        fill(n)
        return settings()

    try:
        fill(3)
        default = settings()
        other = chain_in(f"sqlite:///{tmp_path / 'other.db'}", 2)
        assert default.checkpoints == str(runs.home().audit_checkpoints)
        assert other.checkpoints not in (default.checkpoints, *storage.list_files(default.checkpoints))
        assert audit.verify(default).ok and audit.verify(other).ok
        monkeypatch.setenv("RAYLAB_AUDIT_CHECKPOINTS", default.checkpoints)
        chain_in(f"sqlite:///{tmp_path / 'third.db'}", 2)
        assert first(audit.verify(default)) == (1, "rewritten")
    finally:
        controldb.dispose_all()


def test_the_default_checkpoints_ignore_the_database_password():
    from raylab.core.audit.settings import default_checkpoints

    one, rotated = (default_checkpoints(f"postgresql+psycopg2://ada:{pw}@db.acme/control") for pw in ("old", "new"))
    assert one == rotated != default_checkpoints("postgresql+psycopg2://ada:old@db.acme/other")
    assert "old" not in one


def test_a_recomputed_single_entry_is_named(db):
    fill()
    untouched_verifies()
    row = chain.rows(settings())[3]  # entry 4, its own hash recomputed after the edit
    body = {**chain.body_of(row), "actor": "mallory@evil"}
    sql("update audit_log set actor = 'mallory@evil', hash = :h where seq = 4", h=chain.entry_hash(body))
    assert first(audit.verify(settings())) == (4, "replaced")


CHILD = textwrap.dedent("""
    import os, sys, time
    from raylab.core import events
    open(sys.argv[3] + "." + sys.argv[2], "w").close()   # ready
    while not os.path.exists(sys.argv[3]):               # every writer starts at once
        time.sleep(0.01)
    for i in range(int(sys.argv[1])):
        events.emit("serve.deploy", model="acme", version=i, writer=sys.argv[2])
""")


def test_eight_processes_appending_at_once_keep_one_chain(db, tmp_path):
    # From an empty database and no key: the migration and the key's creation race too.
    per, go = 15, tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(per), f"w{w}", str(go)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
             for w in range(8)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("go.w*"))) < 8 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    report = audit.verify(settings())
    assert report.ok, report.problems
    assert report.entries == 8 * per and report.checkpoints == 8 * per
    by_writer = {}
    for e in audit.entries(settings()):
        by_writer.setdefault(e["fields"]["writer"], []).append(int(e["version"]))
    assert {w: sorted(v) for w, v in by_writer.items()} == {f"w{w}": list(range(per)) for w in range(8)}


def test_filters(db):
    fill()
    s = settings()
    assert [e["seq"] for e in audit.entries(s, audit.Filter(kinds=("registry",)))] == [2, 4, 6]
    assert [e["seq"] for e in audit.entries(s, audit.Filter(kinds=("stage.end",)))] == [1, 3, 5]
    assert [e["seq"] for e in audit.entries(s, audit.Filter(models=("acme/2",)))] == [2]
    assert [e["seq"] for e in audit.entries(s, audit.Filter(actors=("ada",)))] == list(range(1, N + 1))
    assert list(audit.entries(s, audit.Filter(actors=("ad",)))) == []  # a prefix of a user is not the user
    assert [e["seq"] for e in audit.entries(s, audit.Filter(limit=2))] == [5, 6]
    t3 = list(audit.entries(s))[2]["time"]
    assert all(e["time"] >= t3 for e in audit.entries(s, audit.Filter(since=t3)))
    assert all(e["time"] < t3 for e in audit.entries(s, audit.Filter(until=t3)))
    assert list(audit.entries(s, audit.Filter(since=chain.parse_time("1h", "--since"))))
    assert list(audit.entries(s, audit.Filter(until=chain.parse_time("2000-01-01", "--until")))) == []


def _newest_revision() -> str:
    """The head of raylab's migration scripts (what a fresh database is upgraded to)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(controldb.MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_the_version_table_is_raylabs_own(db):
    fill(1)
    eng = controldb.engine(settings().database)
    names = set(sa.inspect(eng).get_table_names())
    assert {"audit_log", controldb.VERSION_TABLE} <= names and "alembic_version" not in names
    with eng.connect() as conn:
        assert conn.execute(sa.text(f"select version_num from {controldb.VERSION_TABLE}")).scalar() == _newest_revision()
