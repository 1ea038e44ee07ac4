"""Promote, rollback and deploy through the service (serve/registry_api.py,
routers/release.py), driven by `raylab models promote|rollback` and `raylab deploy` with
$RAYLAB_API_URL set (cli/apiclient.py): the caller's key decides, not the shell's user. An
ml_engineer cannot promote, a version's creator cannot approve it even with an approver key,
another organisation's approver gets the same 404 as for a model that does not exist, an
approver of the org can, and each decision is in the audit log under the key's identity. A
deploy needs serve.deploy: a viewer is refused before anything is tried; an admin's deploy
reaches the endpoint's dashboard (none runs here, so the deploy itself is refused, 409).

    pytest tests/unit/serve/test_release_api.py
"""

from __future__ import annotations

import ftapi
import pytest
from fastapi.testclient import TestClient

from raylab.cli import main
from raylab.core import audit, controldb
from raylab.core.access import keys
from registry_helpers import aliases, open_test_store, register


@pytest.fixture
def release(tmp_path, monkeypatch, capsys):
    store = open_test_store(tmp_path, monkeypatch)  # RAYLAB_HOME: the service's registry is this one
    app, users = ftapi.make_app(tmp_path, monkeypatch)
    db = app.state.ingress.ftapi.db
    for who, org, role in (("ada", "acme", "approver"), ("carol", "acme", "approver"),
                           ("erin", "globex", "approver"), ("root", "acme", "admin")):
        users[f"{who}-{role}"] = keys.create(db, org, role, who, by="root@host")[0]
    monkeypatch.setenv("RAYLAB_USER", "ada")  # the versions' creator, as a job the service submitted records
    monkeypatch.setenv("RAYLAB_ORG", "acme")
    v1, v2 = register(store, tmp_path, 1), register(store, tmp_path, 2, gates="failed")
    monkeypatch.setenv("RAYLAB_USER", "someone-else")  # who runs the CLI is not the point: the key is
    with ftapi.loopback(app) as url:
        def run(key: str, *argv: str) -> tuple[int, str, str]:
            token = users[key] if isinstance(users[key], str) else users[key]["Authorization"].split()[1]
            monkeypatch.setenv("RAYLAB_API_URL", url.removesuffix("/v1"))
            monkeypatch.setenv("RAYLAB_API_KEY", token)
            code = main(list(argv))
            out = capsys.readouterr()
            return code, out.out, out.err
        yield run, store, (v1, v2), app, users
    controldb.dispose_all()


def test_promote_and_rollback_hold_roles_orgs_and_separation_of_duties(release):
    run, store, (v1, v2), app, _ = release
    refused = [("ada", "403", "may not models.promote"),                 # an ml_engineer
               ("ada-approver", "403", "separation of duties"),         # an approver, but v1's creator
               ("erin-approver", "404", "model 'widgets/1' not found")]  # another organisation's approver
    for who, status, reason in refused:
        code, _, err = run(who, "models", "promote", "widgets", str(v1), "--reason", "ship it")
        assert code == 2 and status in err and reason in err and "Traceback" not in err, (who, err)
    assert aliases(store) == {}  # nothing moved
    # the control for the 404: an unknown model reads exactly like another org's version
    code, _, err = run("erin-approver", "models", "promote", "nothing", "1")
    assert code == 2 and "404 model 'nothing/1' not found" in err

    code, out, err = run("carol-approver", "models", "promote", "widgets", str(v1), "--reason", "reviewed")
    assert code == 0 and out.strip() == f"widgets: production None -> {v1}", err
    assert aliases(store) == {"production": v1}
    # v2 failed its gates: the registry's refusal, as the caller's 400, names what to do
    code, _, err = run("carol-approver", "models", "promote", "widgets", str(v2))
    assert code == 2 and "400" in err and "its gates are 'failed'" in err and aliases(store) == {"production": v1}
    code, out, _ = run("carol-approver", "models", "promote", "widgets", str(v2), "--force", "--reason", "hotfix")
    assert code == 0 and aliases(store) == {"production": v2, "previous": v1}

    # rollback back to ada's v1: not by ada; another org cannot see the model at all
    code, _, err = run("ada-approver", "models", "rollback", "widgets")
    assert code == 2 and "separation of duties" in err
    code, _, err = run("erin-approver", "models", "rollback", "widgets")
    assert code == 2 and "404 model 'widgets@production' not found" in err and "previous" not in err
    code, out, _ = run("carol-approver", "models", "rollback", "widgets", "--reason", "p99 regressed")
    assert code == 0 and f"production {v2} -> {v1}" in out and aliases(store)["production"] == v1

    logged = [(e["kind"], e["actor"], e["fields"].get("rule"))
              for e in audit.entries(audit.Settings.from_env(), audit.Filter(kinds=("access", "registry")))]
    assert ("access.deny", "ada", "role") in logged and ("access.deny", "ada", "separation-of-duties") in logged
    assert ("access.deny", "erin", "org-scope") in logged
    promotes = [(k, who) for k, who, _ in logged if k in ("registry.promote", "registry.rollback")]
    assert promotes == [("registry.promote", "carol"), ("registry.promote", "carol"), ("registry.rollback", "carol")]


def test_deploy_through_the_service_needs_serve_deploy(release):
    run, _, (v1, _), app, users = release
    code, _, err = run("vic", "deploy", f"widgets/{v1}")
    assert code == 2 and "403" in err and "may not serve.deploy" in err
    code, _, err = run("erin-approver", "deploy", f"widgets/{v1}")  # another org: as if it did not exist
    assert code == 2 and f"404 model 'widgets/{v1}' not found" in err
    # an admin passes the check and the deploy is tried: no endpoint runs here, so it is refused
    code, _, err = run("root-admin", "deploy", f"widgets/{v1}")
    assert code == 2 and "409" in err and "Traceback" not in err, err
    code, _, err = run("root-admin", "deploy", f"widgets/{v1}", "--canary", "10")
    assert code == 2 and "--canary: not available through the service" in err
    # the body is checked after the caller: unknown keys are a 400 naming them
    client = TestClient(app)
    bad = client.post("/v1/registry/deploy", json={"ref": "widgets/1", "force": True},
                      headers={"Authorization": f"Bearer {users['root-admin']}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "force"
    assert client.post("/v1/registry/deploy", json={"ref": "x"}).status_code == 401


def test_load_and_unload_through_the_service_need_serve_load(release):
    """`raylab deploy REF --load|--unload` through the service: a viewer and an ml_engineer
    may not (403), another organisation gets the 404 of a version that does not exist, and an
    admin passes the check and reaches the endpoint (none runs here: 409 naming why, no
    traceback). The control: the admin's refusal is the endpoint's, not access's."""
    run, _, (v1, _), app, users = release
    for who in ("vic", "ada"):
        for flag in ("--load", "--unload"):
            code, _, err = run(who, "deploy", f"widgets/{v1}", flag)
            assert code == 2 and "403" in err and "may not serve.load" in err, (who, flag, err)
    code, _, err = run("erin-approver", "deploy", f"widgets/{v1}", "--load")
    assert code == 2 and f"404 model 'widgets/{v1}' not found" in err
    code, _, err = run("root-admin", "deploy", f"widgets/{v1}", "--load")
    assert code == 2 and "409" in err and "dashboard" in err and "Traceback" not in err, err
    code, _, err = run("root-admin", "deploy", "--load")
    assert code == 2 and "give the REF" in err
    client = TestClient(app)
    assert client.post("/v1/registry/unload", json={"ref": "widgets/1"}).status_code == 401
    bad = client.post("/v1/registry/load", json={"ref": "widgets/1", "pin": True},
                      headers={"Authorization": f"Bearer {users['root-admin']}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "pin"
    decided = [(e["kind"], e["actor"]) for e in audit.entries(audit.Settings.from_env(), audit.Filter(kinds=("access",)))
               if e["fields"].get("action") == "serve.load"]
    assert decided.count(("access.deny", "ada")) == 2 and ("access.deny", "erin") in decided, decided
    assert ("access.allow", "root") in decided, decided


def test_an_unreachable_dashboard_is_retried_only_while_it_may_be_busy(monkeypatch):
    """deploy.rest: a refused connection (nothing listens: a wrong --address) is asked once
    more, then exit 2 naming --address; a dropped connection (a busy dashboard that accepts
    and closes) is retried through the whole backoff (the control)."""
    import socket
    import threading

    from raylab.errors import UserError
    from raylab.serve import deploy

    pauses = []
    monkeypatch.setattr(deploy.time, "sleep", pauses.append)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="pass its http:// address with --address"):
        deploy.rest(f"http://127.0.0.1:{port}", "GET", attempts=4)
    assert pauses == [1.0]

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def drop():  # accept each connection and close it: a busy dashboard
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=drop, daemon=True).start()
    pauses.clear()
    try:
        with pytest.raises(UserError):
            deploy.rest(f"http://127.0.0.1:{server.getsockname()[1]}", "GET", timeout=5, attempts=4)
    finally:
        server.close()
    assert pauses == [1.0, 2.0, 4.0]
