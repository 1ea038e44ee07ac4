"""retry_delay: exponential backoff, a server's Retry-After honoured, both bounded."""

from __future__ import annotations

import email.utils

from raylab.data.sources.http import retry_delay


def test_backoff_doubles_up_to_the_bound():
    assert [retry_delay(n, 0.5, None, 3.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]


def test_retry_after_seconds_is_honoured_when_longer_than_the_backoff():
    assert retry_delay(1, 0.01, "2", 60.0) == 2.0
    assert retry_delay(1, 0.01, " 1.5 ", 60.0) == 1.5
    assert retry_delay(3, 1.0, "2", 60.0) == 4.0  # the backoff is already longer


def test_retry_after_is_bounded():
    assert retry_delay(1, 0.01, "3600", 5.0) == 5.0


def test_retry_after_http_date():
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert retry_delay(1, 0.01, date, 60.0, now=now) == 7.0
    assert retry_delay(1, 0.01, email.utils.formatdate(now - 30, usegmt=True), 60.0, now=now) == 0.01  # past


def test_unparseable_retry_after_falls_back_to_the_backoff():
    assert retry_delay(2, 0.25, "soon", 60.0) == 0.5
    assert retry_delay(2, 0.25, "", 60.0) == 0.5
