"""`raylab jobs` (raylab/cli/jobs.py) against the fine-tuning service's standalone app on a
loopback server, in process: every action goes through the HTTP API with the caller's key,
so the service's refusals (a bad file, another org, a role that may not, a job in the wrong
state) come back as exit 2 with the service's message. No Ray: submissions go to a closed
port, so a created job is `failed` with `submission_failed`.

    pytest tests/unit/serve/test_jobs_cli.py
"""

from __future__ import annotations

import json

import ftapi
import pytest
from ftapi import BASE, chat_jsonl

from raylab.cli import main

app_env = ftapi.app_env


@pytest.fixture
def cli(app_env, monkeypatch, capsys):
    app, users, tmp_path = app_env
    with ftapi.loopback(app) as url:
        def run(who: str | None, *argv: str) -> tuple[int, str, str]:
            monkeypatch.setenv("RAYLAB_API_URL", url.removesuffix("/v1"))
            if who is None:
                monkeypatch.delenv("RAYLAB_API_KEY", raising=False)
            else:
                monkeypatch.setenv("RAYLAB_API_KEY", users[who]["Authorization"].split()[1])
            code = main(["jobs", *argv])
            out = capsys.readouterr()
            return code, out.out, out.err
        yield run, tmp_path


def test_create_list_events_and_state_changes_through_the_api(cli):
    run, tmp_path = cli
    good = tmp_path / "train.jsonl"
    good.write_bytes(chat_jsonl(12))
    # the service runs in this process: its first audited decision announces the audit signing
    # key it creates on the console, which a later --json would share stdout with
    assert run("ada", "list")[0] == 0
    code, out, err = run("ada", "create", str(good), "--model", BASE, "--suffix", "colours", "--n-epochs", "1", "--json")
    assert code == 0, err
    job = json.loads(out)
    assert job["status"] == "failed" and job["error"]["code"] == "submission_failed" and job["suffix"] == "colours"
    assert job["hyperparameters"]["n_epochs"] == 1
    code, out, _ = run("ada", "list")
    assert code == 0 and out.split()[:2] == [job["id"], "failed"]
    code, out, _ = run("ada", "events", job["id"])
    lines = out.splitlines()
    assert code == 0 and "Validating training file" in lines[0] and "could not be submitted" in lines[-1]  # oldest first
    code, out, _ = run("ada", "checkpoints", job["id"], "--json")
    assert code == 0 and json.loads(out) == {"data": []}
    # the service's refusals, as exit 2 with its message
    code, _, err = run("ada", "cancel", job["id"])
    assert code == 2 and "400" in err and "a finished job cannot be cancelled" in err and "Traceback" not in err
    code, _, err = run("bob", "events", job["id"])  # another organisation
    assert code == 2 and "404" in err and "No such fine-tuning job" in err
    code, _, err = run("vic", "create", str(good), "--model", BASE)  # a viewer
    assert code == 2 and "403" in err and "not allowed" in err
    few = tmp_path / "few.jsonl"
    few.write_bytes(chat_jsonl(3))
    code, _, err = run("ada", "create", str(few), "--model", BASE)
    assert code == 2 and "training_file" in err and "400" in err


def test_missing_settings_and_an_unreachable_service_name_what_to_set(cli, monkeypatch):
    run, tmp_path = cli
    code, _, err = run(None, "list")
    assert code == 2 and "RAYLAB_API_KEY is not set" in err
    monkeypatch.setenv("RAYLAB_API_KEY", "rlk_x")
    monkeypatch.setenv("RAYLAB_API_URL", f"http://127.0.0.1:{ftapi.closed_port()}")
    assert main(["jobs", "list"]) == 2
    code, _, err = run("ada", "create", str(tmp_path / "absent.jsonl"), "--model", BASE)
    assert code == 2 and "absent.jsonl" in err
