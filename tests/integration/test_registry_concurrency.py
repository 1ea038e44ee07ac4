"""The registry under concurrency, from separate processes on one real MLflow store: 8
promotes and rollbacks at once all land in the alias history, each as one unbroken block,
numbered without a gap and replaying to the final aliases; 4 processes loading the same
version through models.load at once (an empty cache: all download and race to put their copy
in place) all verify and load the same weights. The unit tests (tests/unit/registry/
test_locks.py) hold the negative control: without the lock, an interleaved promote is lost.
On PostgreSQL the lock is an advisory lock: one session excludes another, and a holder that
dies frees it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from integration.test_data import postgres  # noqa: F401  (the throwaway PostgreSQL server)

from raylab import registry
from raylab.core import events, runs
from raylab.errors import UserError
from raylab.registry import locks
from registry_helpers import aliases, open_test_store, register

pytestmark = pytest.mark.integration

# Each child connects first, says "ready", then waits for the start file, so that all of
# them reach the registry at the same moment rather than one after another as they start.
START = textwrap.dedent("""
    import json, os, sys, time
    from raylab import registry
    from raylab.errors import UserError
    store = registry.open_store()
    registry.registered_model(store, "widgets")
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(sys.argv[1]):
        if time.monotonic() > deadline:
            sys.exit("no start signal within 120 s")
        time.sleep(0.005)
""")

MOVE = START + textwrap.dedent("""
    op, arg = sys.argv[2], sys.argv[3]
    try:
        moves = (registry.promote(store, "widgets", int(arg)) if op == "promote"
                 else registry.rollback(store, "widgets", reason=arg))
        print(json.dumps({"moves": moves}))
    except UserError as e:
        print(json.dumps({"error": str(e)}))
""")

LOAD = START + textwrap.dedent("""
    import hashlib
    from raylab import models
    inf = models.load(sys.argv[2])
    digest = hashlib.sha256()
    for key, tensor in sorted(inf.model.state_dict().items()):
        digest.update(key.encode() + tensor.numpy().tobytes())
    print(json.dumps({"path": inf.path, "kind": inf.kind, "weights": digest.hexdigest(),
                      "encodes": inf.tokenizer("ships today")["input_ids"]}))
""")


def run_together(tmp_path: Path, script: str, argvs: list[list[str]], timeout_s: float = 300) -> list[dict]:
    """Start one process per argv, release them together, return each one's last JSON line."""
    start = tmp_path / "start"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(start), *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for argv in argvs]
    try:
        for p in procs:  # readline returns at "ready", or at EOF if the child died first
            assert p.stdout.readline().strip() == "ready", p.communicate(timeout=timeout_s)[1][-3000:]
        start.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, monkeypatch):
    """A fresh registry: SQLite under $RAYLAB_HOME, or MLflow's tables in the throwaway
    PostgreSQL (artifacts in tmp_path); the child processes find it through the environment."""
    store = open_test_store(tmp_path, monkeypatch)
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres")
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; raylab's extra is psycopg2
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("postgresql://", "postgresql+psycopg2://"))
        store = dataclasses.replace(registry.open_store(), artifact_root=str(tmp_path / "artifacts"))
    return store


def test_eight_concurrent_promotes_and_rollbacks_all_land_in_the_history_in_order(store, tmp_path):
    versions = [register(store, tmp_path, n) for n in range(1, 8)]
    for v in versions[:3]:  # production v3, previous v2: something to roll back to
        registry.promote(store, "widgets", v)
    before = registry.alias_history(store, "widgets")

    ops = [["promote", str(v)] for v in versions[3:]] + [["rollback", f"rollback #{i}"] for i in range(4)]
    results = run_together(tmp_path, MOVE, [ops[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)])

    errors = [r["error"] for r in results if "error" in r]
    # A rollback that runs right after another may find no previous version left: refused,
    # and it moves nothing. No other error (a lock timeout, a database error) is acceptable.
    assert all("has no previous production version" in e for e in errors), errors
    made = [r["moves"] for r in results if "moves" in r]
    # every promote moves previous then production (production always existed), every
    # rollback production then previous; the first rollback always finds a previous
    assert sorted(m[1]["alias"] for m in made).count("production") == 4 and len(made) >= 5
    assert all(len(m) == 2 for m in made)

    history = registry.alias_history(store, "widgets")
    # every move is there, numbered 0..N-1 without a gap or a reuse
    assert [h["seq"] for h in history] == list(range(len(before) + sum(len(m) for m in made)))
    entries = [{k: v for k, v in h.items() if k != "seq"} for h in history]
    # each promote or rollback is one unbroken block: no other move slipped in between
    for moves in made:
        assert any(entries[i:i + len(moves)] == moves for i in range(len(entries))), moves
    # each move started from where the previous move left its alias: replaying the history
    # move by move reaches exactly the aliases the registry has now
    state: dict[str, int] = {}
    for h in history:
        assert state.get(h["alias"]) == h["from"], (h, state)
        if h["to"] is None:
            state.pop(h["alias"])
        else:
            state[h["alias"]] = h["to"]
    assert state == aliases(store)
    # and one promote/rollback event each, concurrent appends to the events file included
    recorded = [e for f in sorted((tmp_path / "home" / "events").glob("*.jsonl")) for e in events.read(str(f))]
    assert len([e for e in recorded if e["kind"] in ("registry.promote", "registry.rollback")]) == 3 + len(made)


def test_four_processes_load_the_same_version_at_once(tmp_path, monkeypatch, tiny_model_dir):
    store = open_test_store(tmp_path, monkeypatch)
    version = register(store, tmp_path, 1, final=tiny_model_dir)
    cache = runs.home().registry_cache("widgets", version)
    assert not cache.exists()  # every process downloads: they race to put their copy in place

    results = run_together(tmp_path, LOAD, [[f"widgets/{version}"]] * 4)

    assert {r["path"] for r in results} == {str(cache)}
    assert {r["kind"] for r in results} == {"base"}
    assert len({r["weights"] for r in results}) == 1 and len({json.dumps(r["encodes"]) for r in results}) == 1
    # the copy in place is the registered one, file for file, and no download was left behind
    assert registry.checksums(str(cache)) == registry.checksums(str(tiny_model_dir))
    assert sorted(p.name for p in cache.parent.iterdir()) == [str(version)]


PG_HOLDER = textwrap.dedent("""
    import sys
    from raylab import registry
    from raylab.registry import locks
    with locks.alias_lock(registry.Store(None, sys.argv[1], None), "widgets"):
        print("held", flush=True)
        sys.stdin.readline()
""")


def test_postgresql_advisory_lock_excludes_other_sessions_until_its_holder_dies(postgres):  # noqa: F811
    impatient = registry.Store(None, postgres, None, lock_timeout_s=0.3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", PG_HOLDER, postgres], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        key = locks.advisory_key("widgets")
        with pytest.raises(UserError, match=rf"registry lock pg_advisory_lock\({key}\) for model 'widgets' is held by "
                                            rf"PostgreSQL backend \d+ \(raylab alias lock: pid {holder.pid} on "):
            with locks.alias_lock(impatient, "widgets"):
                pass
        with locks.alias_lock(impatient, "gadgets"):  # another model's moves are not held up
            pass
        holder.kill()  # dies holding it: the server ends its session and the lock goes with it
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
    with locks.alias_lock(registry.Store(None, postgres, None, lock_timeout_s=30), "widgets"):
        with pytest.raises(UserError, match="is held by PostgreSQL backend"):  # and now this process holds it
            with locks.alias_lock(impatient, "widgets"):
                pass
