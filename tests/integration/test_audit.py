"""A real stage's events land in the audit chain: the data stage on the session's Ray (its
events go through the cluster's writer actor, which appends them with the driver's settings).

    pytest -m "integration or not integration" tests/integration/test_audit.py
"""

from __future__ import annotations

import pytest

from raylab.core import audit

pytestmark = pytest.mark.integration


def test_the_data_stages_events_are_in_the_verified_chain(learn_data):
    _, out = learn_data
    settings = audit.Settings.from_env()
    mine = [(e["kind"], e["fields"].get("stage"), e["actor_kind"])
            for e in audit.entries(settings, audit.Filter(kinds=("stage",))) if e["run"] == str(out)]
    assert ("stage.start", "data", "os-user") in mine and ("stage.end", "data", "os-user") in mine
    assert mine.index(("stage.start", "data", "os-user")) < mine.index(("stage.end", "data", "os-user"))
    report = audit.verify(settings)
    assert report.ok, report.problems
    assert report.entries >= 2 and report.unsigned_tail == 0
