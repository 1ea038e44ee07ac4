"""A version is loaded into a replica's engine once, however many hold it (Serve's LRU through
`Held`, an operator's pin from `raylab deploy REF --load`), and leaves only when nothing holds
it and no request decodes with it (generator.Loaded). The end-to-end path (the service, the
dashboard, every replica's reconfigure) is tests/integration/test_serve.py's.

    pytest tests/unit/serve/test_pinning.py
"""

from __future__ import annotations

import asyncio
import threading

from raylab.serve.generator import GeneratorBase, Held, Loaded


def _loaded():
    dropped = []
    return Loaded("m/1", object(), None, "a1", dropped.append), dropped


def test_the_lrus_eviction_drops_a_version_once_its_last_request_ends():  # the control for the pin
    one, dropped = _loaded()
    assert one.hold()
    held = Held(one)
    assert one.acquire()
    held.__del__()  # what Serve's LRU calls on eviction
    assert dropped == []  # a request still decodes with it
    one.release()
    assert dropped == [one] and one.gone
    held.__del__()  # the garbage collector's later call counts for nothing
    assert dropped == [one]
    assert not one.acquire() and not one.hold()  # a request that raced the eviction asks again


def test_a_pinned_version_survives_the_lrus_eviction_and_leaves_when_unpinned():
    one, dropped = _loaded()
    assert one.hold() and one.hold()  # the LRU's entry and the operator's pin: one engine copy
    Held(one).__del__()
    assert dropped == [] and not one.gone
    assert one.acquire()
    one.let_go()  # unloaded while a request decodes: it leaves when that request ends
    assert dropped == []
    one.release()
    assert dropped == [one]


class _Replica(GeneratorBase):
    """GeneratorBase's version bookkeeping without Serve, torch or a model: `_load` counts."""

    def __init__(self):
        self._live, self._loading, self._pinned, self.loads = {}, {}, {}, 0

    async def _load(self, version: str) -> Loaded:
        self.loads += 1
        await asyncio.sleep(0.01)  # a load takes time: concurrent callers must wait for this one
        self._live[version] = found = Loaded(version, object(), None, None, lambda x: self._live.pop(x.version))
        return found


def test_concurrent_callers_and_a_pin_share_one_load():
    async def scenario():
        r = _Replica()
        first, second = await asyncio.gather(r._holding("m/2"), r._holding("m/2"))
        assert first is second and r.loads == 1
        await r._repin(["m/2"])  # the operator's pin takes the same copy
        assert r._pinned["m/2"] is first and r.loads == 1
        first.let_go()
        second.let_go()  # the two LRU-like holds end; the pin keeps it
        assert "m/2" in r._live
        await r._repin([])
        assert "m/2" not in r._live and first.gone
        again = await r._holding("m/2")  # asked after it left: loaded anew
        assert again is not first and r.loads == 2

    asyncio.run(scenario())


def test_holds_and_lets_go_from_two_threads_drop_exactly_once():
    one, dropped = _loaded()
    for _ in range(2000):
        assert one.hold()

    def let_go_many():
        for _ in range(1000):
            one.let_go()

    threads = [threading.Thread(target=let_go_many) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dropped == [one]


class _Gauges:
    """Records what the replica's metrics are set to: {(name, version): value}."""

    def __init__(self):
        self.values, self.batches = {}, []

    def set(self, name, value, tags):
        self.values[(name, f"{tags['model']}/{tags['version']}")] = value

    def observe(self, name, value, tags):
        self.batches.append((f"{tags['model']}/{tags['version']}", value))


def test_two_base_engines_in_one_replica_keep_each_others_gauges():
    """A replica holding vLLM's base engine and the transformers engine (a version vLLM
    refused): each engine's step sets its own versions' running/queue gauges and zeroes only
    its own versions that left its batch; a version that left the replica is zeroed too. The
    control: the other engine's version keeps its value through this engine's steps."""
    r = _Replica()
    r.metrics, r._observed = _Gauges(), set()
    vllm, torch_engine = object(), object()
    r._adapter_versions = {"a1": "m/1", "a3": "m/3"}
    r._live = {"m/1": Loaded("m/1", vllm, None, "a1", lambda _: None),
               "m/3": Loaded("m/3", torch_engine, None, "a3", lambda _: None)}
    r._observe(vllm, None, ["a1", "a1", None], [])
    r._observe(torch_engine, None, ["a3"], ["a3"])
    assert r.metrics.values[("running", "m/1")] == 2 and r.metrics.values[("queue_depth", "m/3")] == 1
    assert ("m/1", 3) in r.metrics.batches  # the batch's size, the base's own row included
    r._observe(vllm, None, [], [])  # vLLM idle: its version goes to 0, the other engine's stays
    assert r.metrics.values[("running", "m/1")] == 0 and r.metrics.values[("running", "m/3")] == 1
    del r._live["m/3"]  # m/3 left the replica mid-batch: the next step of any engine zeroes it
    r._observe(vllm, None, ["a1"], [])
    assert r.metrics.values[("running", "m/3")] == 0 and r.metrics.values[("queue_depth", "m/3")] == 0
    assert r._observed == {"m/1"}
