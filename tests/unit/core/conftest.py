"""Unit tests here exercise the in-process event path (`events._append`). When the integration
tier ran first in the same pytest process, its session Ray is still connected, and `events.emit`
would hand each event to the cluster's writer actor instead: a process with its own cached keys
and environment (no moto, no AWS region), so a test of this process's key handling would check
the actor's. Ray is not the subject here; the path without it is."""

from __future__ import annotations

import pytest

from raylab.core import events


@pytest.fixture(autouse=True)
def events_in_process(monkeypatch):
    monkeypatch.setattr(events, "_writer", lambda: None)
