"""Separation of duties on the registry's promote path (raylab/registry/aliases.py with a
core.access principal): the version records its creator and org at registration; its creator
cannot promote it even as an approver, an ml_engineer cannot promote, another org's approver
gets "not found", another approver of the org can; each decision and the promotion itself are
in the audit log under the identity. Without a principal (embedded single-user mode) nothing
is enforced and the OS user is recorded.

    pytest tests/unit/registry/test_access_promote.py
"""

from __future__ import annotations

import pytest

from raylab import registry
from raylab.core import access, audit, controldb, events
from registry_helpers import aliases, open_test_store, register


@pytest.fixture
def store(tmp_path, monkeypatch):
    # In-process events: a session Ray left connected by the integration tier would hand them to
    # its writer actor, whose environment names another audit database.
    monkeypatch.setattr(events, "_writer", lambda: None)
    monkeypatch.setenv("RAYLAB_DATABASE_URL", f"sqlite:///{tmp_path / 'control.db'}")
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    monkeypatch.setenv("RAYLAB_AUDIT_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.delenv("RAYLAB_AUDIT", raising=False)
    monkeypatch.setenv("RAYLAB_USER", "ada")  # the trainer: what the service sets for a job it submits
    monkeypatch.setenv("RAYLAB_ORG", "acme")
    yield open_test_store(tmp_path, monkeypatch)
    controldb.dispose_all()


def key(subject: str, role: str, org: str = "acme") -> access.Principal:
    return access.Principal(subject, org, frozenset({role}), "api-key", f"id-{subject}")


def test_separation_of_duties_on_promote_and_rollback_and_none_in_embedded_mode(store, tmp_path, monkeypatch):
    # One test, one MLflow store: opening a store costs seconds, the checks below milliseconds.
    v1 = register(store, tmp_path, 1)
    tags = store.client.get_model_version("widgets", str(v1)).tags
    assert (tags[access.CREATOR_TAG], tags[access.ORG_TAG]) == ("ada", "acme")

    refused = [(key("ada", "approver"), 403, "separation of duties"),   # an approver, but its creator
               (key("bob", "ml_engineer"), 403, "may not models.promote"),
               (key("erin", "approver", org="globex"), 404, "not found")]
    for principal, status, reason in refused:
        with pytest.raises(access.Denied, match=reason) as e:
            registry.promote(store, "widgets", v1, principal=principal)
        assert e.value.decision.status == status
    assert aliases(store) == {}  # nothing moved

    monkeypatch.setenv("RAYLAB_USER", "bob")  # who runs the promoting process is not the point: the principal is
    registry.promote(store, "widgets", v1, principal=key("carol", "approver"))
    assert aliases(store) == {"production": v1}

    v2 = register(store, tmp_path, 2)  # bob's
    registry.promote(store, "widgets", v2, principal=key("ada", "approver"))
    with pytest.raises(access.Denied, match="separation of duties"):  # back to ada's v1, by ada
        registry.rollback(store, "widgets", principal=key("ada", "approver"))
    registry.rollback(store, "widgets", principal=key("bob", "approver"))
    assert aliases(store)["production"] == v1

    # Embedded single-user mode: no principal, nothing enforced (bob promotes bob's version),
    # the OS user recorded.
    registry.promote(store, "widgets", v2)
    assert aliases(store)["production"] == v2

    logged = [(e["kind"], e["actor"], e["actor_kind"], e["fields"].get("rule"))
              for e in audit.entries(audit.Settings.from_env(), audit.Filter(kinds=("access", "registry")))
              if e["kind"] != "registry.register"]
    assert logged[:5] == [("access.deny", "ada", "api-key", "separation-of-duties"),
                          ("access.deny", "bob", "api-key", "role"),
                          ("access.deny", "erin", "api-key", "org-scope"),
                          ("access.allow", "carol", "api-key", "grant"),
                          ("registry.promote", "carol", "api-key", None)]
    assert logged[5:9] == [("access.allow", "ada", "api-key", "grant"), ("registry.promote", "ada", "api-key", None),
                           ("access.deny", "ada", "api-key", "separation-of-duties"),
                           ("access.allow", "bob", "api-key", "grant")]
    assert logged[9][:3] == ("registry.rollback", "bob", "api-key")
    last = logged[10]
    assert last[0] == "registry.promote" and last[1].startswith("bob@") and last[2] == "os-user" and len(logged) == 11
