"""`raylab audit verify|log|export` and the `governance` config section: exit 0 on a sound
chain, 1 on a broken one (naming the first bad entry), 2 on a user error; what the config
sets for raylab and its workers. In-process (cli.main), SQLite, no Ray."""

from __future__ import annotations

import json
import os
import stat

import pytest
import sqlalchemy as sa

from raylab import cli, config
from raylab.core import audit, controldb, events
from raylab.errors import ConfigError


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    monkeypatch.delenv("RAYLAB_DATABASE_URL", raising=False)
    monkeypatch.delenv("RAYLAB_AUDIT_CHECKPOINTS", raising=False)
    monkeypatch.delenv("RAYLAB_AUDIT", raising=False)
    monkeypatch.setenv("RAYLAB_USER", "ada")
    yield tmp_path
    controldb.dispose_all()


def fill() -> None:
    events.emit("registry.register", model="acme", version=1)
    events.emit("registry.promote", model="acme", version=1, reason="gates passed")
    events.emit("serve.start", model="other", version=2, url="http://127.0.0.1:8000")


def test_defaults_sqlite_in_home_and_a_private_key_apart(env, caplog):
    fill()
    assert (env / "home" / "raylab.db").exists()
    key = env / "keys" / "audit.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert "created the audit signing key" in caplog.text and str(key) in caplog.text
    assert len(list((env / "home" / "audit" / "checkpoints").glob("*.json"))) == 3


def test_verify_ok_then_broken_exit_codes(env, capsys):
    fill()
    assert cli.main(["audit", "verify"]) == 0
    assert "OK" in capsys.readouterr().out
    with controldb.engine(controldb.url()).begin() as conn:
        conn.execute(sa.text("update audit_log set model = 'evil' where seq = 2"))
    assert cli.main(["audit", "verify"]) == 1
    out = capsys.readouterr().out
    assert "first bad entry 2 (edited)" in out
    assert cli.main(["audit", "verify", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"][0]["entry"] == 2


def test_verify_with_only_the_public_key(env, capsys):
    fill()
    pub = str(env / "keys" / "audit.pem.pub")
    os.environ["RAYLAB_AUDIT_KEY"] = str(env / "elsewhere" / "absent.pem")
    assert cli.main(["audit", "verify", "--public-key", pub]) == 0
    assert cli.main(["audit", "verify"]) == 2  # no key at all: a user error naming what to give
    assert "--public-key" in capsys.readouterr().err


def test_a_key_readable_by_others_is_refused(env, capsys):
    fill()
    key = env / "keys" / "audit.pem"
    key.chmod(0o644)
    from raylab.core.audit import keys

    keys._private.clear()  # as in a fresh process
    assert cli.main(["audit", "verify"]) == 0  # verifying needs only the public half
    with pytest.raises(Exception, match="chmod 600"):
        events.emit("serve.stop", model="acme")


@pytest.mark.parametrize("args, needle", [
    (["audit", "log", "--since", "yesterday"], "--since 'yesterday'"),
    (["audit", "log", "--database", "mysql://u@h/db"], "--database"),
    (["audit", "verify", "--database", "postgresql://u@127.0.0.1:1/none"], "cannot be opened"),
    (["audit", "log", "--database", "sqlite:///nowhere/raylab.db"], "no control-plane database at nowhere/raylab.db"),
])
def test_user_errors_exit_2(env, capsys, args, needle):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_log_filters_and_export(env, capsys, tmp_path):
    fill()
    capsys.readouterr()  # the key's creation message
    assert cli.main(["audit", "log", "--kind", "registry", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in rows] == ["registry.register", "registry.promote"]
    assert cli.main(["audit", "log", "--model", "other"]) == 0
    out = capsys.readouterr().out
    assert "serve.start" in out and "registry" not in out
    assert cli.main(["audit", "log", "--actor", "bob"]) == 0
    assert "no entries" in capsys.readouterr().out
    target = tmp_path / "siem" / "audit.jsonl"
    assert cli.main(["audit", "export", str(target), "--since", "1h"]) == 0
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [e["seq"] for e in lines] == [1, 2, 3] and all(len(e["hash"]) == 64 for e in lines)


def test_audit_can_be_turned_off(env):
    os.environ["RAYLAB_AUDIT"] = "0"
    try:
        fill()
    finally:
        del os.environ["RAYLAB_AUDIT"]
    assert not (env / "home" / "raylab.db").exists() and not (env / "keys" / "audit.pem").exists()


def _cfg(tmp_path, **governance):
    return config.load_dict({"version": 1, "output_dir": str(tmp_path / "run"),
                             "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
                             "model": {"name_or_path": "preset:tiny-llama"}, "governance": governance})


def test_the_config_sets_the_environment_for_raylab_and_its_workers(env, tmp_path, monkeypatch):
    monkeypatch.setenv("PGURL", "postgresql://raylab:pw@db/raylab")
    cfg = _cfg(tmp_path, database="${env:PGURL}",
               audit={"enabled": False, "signing_key": str(tmp_path / "k.pem"), "checkpoints": "s3://b/cp"})
    got = audit.process_env(cfg)
    assert got["RAYLAB_DATABASE_URL"] == "postgresql://raylab:pw@db/raylab" and got["RAYLAB_AUDIT"] == "0"
    assert got["RAYLAB_AUDIT_CHECKPOINTS"] == "s3://b/cp" and got["RAYLAB_AUDIT_KEY"] == str(tmp_path / "k.pem")
    plain = audit.process_env(_cfg(tmp_path))  # nothing configured: the environment passes through
    assert plain == {"RAYLAB_AUDIT_KEY": os.environ["RAYLAB_AUDIT_KEY"]}
    assert controldb.normalise("postgresql://u@h/d") == "postgresql+psycopg2://u@h/d"
    assert controldb.normalise("postgres://u@h/d") == "postgresql+psycopg2://u@h/d"


@pytest.mark.parametrize("governance, needle", [
    ({"databse": "sqlite:///x"}, "governance.databse"),
    ({"database": "mysql://u@h/db"}, "governance.database"),
    ({"audit": {"signing_key": "s3://bucket/key.pem"}}, "governance.audit.signing_key"),
    ({"audit": {"enable": False}}, "governance.audit.enable"),
])
def test_bad_governance_keys_are_named(env, tmp_path, governance, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _cfg(tmp_path, **governance)


def test_the_pipeline_summary_says_whether_the_chain_verifies(env):
    from raylab import pipeline

    fill()
    assert pipeline.audit_summary() == {"verified": True, "entries": 3, "checkpoints": 3}
    with controldb.engine(controldb.url()).begin() as conn:
        conn.execute(sa.text("delete from audit_log where seq = 3"))
    got = pipeline.audit_summary()
    assert got["verified"] is False and "truncated since checkpoint 3" in got["first_problem"]
