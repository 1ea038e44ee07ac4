"""The alias lock: where it lives for each store kind, that it excludes a second promote for
the whole read-modify-write (and that without it a move is lost), its timeout error, and
that a crashed holder does not leave it held."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from raylab import registry
from raylab.errors import UserError
from raylab.registry import aliases as alias_module
from raylab.registry import locks
from registry_helpers import aliases, open_test_store, register


@pytest.fixture
def store(tmp_path, monkeypatch):
    return open_test_store(tmp_path, monkeypatch)


def test_each_store_kind_has_its_lock(tmp_path):
    def at(uri: str) -> str | None:
        return locks.lock_file(registry.Store(None, uri, None), "acme/assistant")

    assert at(f"sqlite:///{tmp_path}/m/mlflow.db") == f"{tmp_path}/m/locks/acme_assistant.aliases.lock"
    assert at(f"file://{tmp_path}/mlruns") == at(str(tmp_path / "mlruns")) == f"{tmp_path}/mlruns/locks/acme_assistant.aliases.lock"
    assert at("http://mlflow:5000") is None and at("postgresql://db/x") is None and at("databricks") is None
    key = locks.advisory_key("acme-assistant")
    assert key == locks.advisory_key("acme-assistant") != locks.advisory_key("acme-assistant2")
    assert -2**63 <= key < 2**63


def _interleave(monkeypatch, second):
    """Run `second()` inside the first history read of the next alias move: the moment a
    concurrent promote would slip in between reading the history and appending to it."""
    read, ran = alias_module._history_tags, []

    def history_tags(store, name):
        found = read(store, name)
        if not ran:
            ran.append(True)
            try:
                second()
            except UserError as e:
                ran.append(e)
        return found

    monkeypatch.setattr(alias_module, "_history_tags", history_tags)
    return ran


def test_a_concurrent_promote_waits_for_the_lock_and_the_history_stays_whole(store, tmp_path, monkeypatch):
    v1, v2, v3 = (register(store, tmp_path, n) for n in (1, 2, 3))
    registry.promote(store, "widgets", v1)
    impatient = dataclasses.replace(store, lock_timeout_s=0.3)
    ran = _interleave(monkeypatch, lambda: registry.promote(impatient, "widgets", v3))
    registry.promote(store, "widgets", v2)

    assert len(ran) == 2, "the second promote never ran inside the first one"
    lock = locks.lock_file(store, "widgets")
    assert f"registry lock {lock} for model 'widgets' is held by pid {os.getpid()} on " in str(ran[1])
    assert "retry when it ends" in str(ran[1])
    assert aliases(store) == {"production": v2, "previous": v1}  # the refused promote moved nothing
    history = registry.alias_history(store, "widgets")
    assert [(h["seq"], h["alias"], h["from"], h["to"]) for h in history] == [
        (0, "production", None, v1), (1, "previous", None, v1), (2, "production", v1, v2)]


def test_without_the_lock_the_same_interleaving_loses_a_move(store, tmp_path, monkeypatch):
    # Negative control: the history check above would pass vacuously if nothing could race.
    v1, v2, v3 = (register(store, tmp_path, n) for n in (1, 2, 3))
    registry.promote(store, "widgets", v1)
    monkeypatch.setattr(alias_module, "alias_lock", lambda store, name: contextlib.nullcontext())
    ran = _interleave(monkeypatch, lambda: registry.promote(store, "widgets", v3))
    registry.promote(store, "widgets", v2)

    assert ran == [True]  # unlocked, the second promote went straight through
    history = registry.alias_history(store, "widgets")
    # 1 + 2 + 2 moves made, but the first promote's `previous` entry took the sequence
    # number the second promote's `previous` entry had just used, and overwrote it.
    assert len(history) == 4
    assert [h["reason"] for h in history if h["alias"] == "previous"] == [f"was production before {v2}"]


def test_history_numbers_continue_past_a_gap(store, tmp_path):
    v1, v2 = register(store, tmp_path, 1), register(store, tmp_path, 2)
    registry.promote(store, "widgets", v1)
    registry.promote(store, "widgets", v2)
    store.client.delete_registered_model_tag("widgets", f"{alias_module.HISTORY_PREFIX}000001")
    registry.rollback(store, "widgets")
    assert [h["seq"] for h in registry.alias_history(store, "widgets")] == [0, 2, 3, 4]


HOLDER = textwrap.dedent("""
    import sys
    from raylab.core import storage
    with storage.exclusive_lock(sys.argv[1], timeout_s=30):
        print("held", flush=True)
        sys.stdin.readline()
""")


def test_a_held_lock_times_out_naming_its_holder_and_a_killed_holder_frees_it(store, tmp_path):
    v1 = register(store, tmp_path, 1)
    lock = locks.lock_file(store, "widgets")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"registry lock {lock} for model 'widgets' is held by pid {holder.pid} on "):
            registry.promote(dataclasses.replace(store, lock_timeout_s=0.3), "widgets", v1)
        assert "production" not in aliases(store)
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel releases a flock
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
    registry.promote(dataclasses.replace(store, lock_timeout_s=5), "widgets", v1)
    assert aliases(store) == {"production": v1}
