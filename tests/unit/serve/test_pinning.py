"""A version an operator loaded (`raylab deploy REF --load`) stays in the replica whatever
Serve's LRU does, and leaves once unloaded and idle (generator.Loaded); one the LRU also
holds stays with the LRU. The end-to-end path (the service, the dashboard, every replica's
reconfigure) is tests/integration/test_serve.py's.

    pytest tests/unit/serve/test_pinning.py
"""

from __future__ import annotations

from raylab.serve.generator import Loaded


def _loaded(held_by_lru: bool = True):
    dropped = []
    return Loaded("m/1", object(), None, "a1", dropped.append, held_by_lru), dropped


def test_the_lrus_eviction_drops_an_unpinned_version_once_idle():  # the control for the pin
    one, dropped = _loaded()
    one.acquire()
    one.__del__()  # what Serve's LRU calls on eviction
    assert dropped == []  # a request still decodes with it
    one.release()
    assert dropped == [one]


def test_a_pinned_version_survives_eviction_and_leaves_when_unpinned():
    one, dropped = _loaded()
    one.pin()
    one.__del__()
    assert dropped == []
    one.acquire()
    one.unpin()
    assert dropped == []  # unloaded while a request decodes: it leaves when that request ends
    one.release()
    assert dropped == [one]
    one.__del__()  # the garbage collector's later call changes nothing
    assert dropped == [one]


def test_a_copy_loaded_for_the_pin_alone_leaves_on_unpin_and_the_lrus_own_stays():
    own, dropped = _loaded(held_by_lru=False)
    own.pin()
    own.unpin()
    assert dropped == [own]
    shared, dropped = _loaded(held_by_lru=True)  # pinned while the LRU held it: stays with the LRU
    shared.pin()
    shared.unpin()
    assert dropped == []
    shared.__del__()
    assert dropped == [shared]
