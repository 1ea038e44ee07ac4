"""redact_url: the one way a URL is shown (errors, logs, events, manifests)."""

from __future__ import annotations

import pytest

from raylab.core.secrets import redact_url, scrub, url_secrets


@pytest.mark.parametrize(("url", "shown"), [
    ("https://api.example.com/v1/items?page=2&api_key=abc123", "https://api.example.com/v1/items?page=2&api_key=***"),
    ("https://h/x?access_token=a&Refresh-Token=b&sig=c&Signature=d&password=e&client_secret=f&key=g",
     "https://h/x?access_token=***&Refresh-Token=***&sig=***&Signature=***&password=***&client_secret=***&key=***"),
    ("https://bucket.s3.amazonaws.com/o?X-Amz-Credential=AKIA&X-Amz-Signature=ff&X-Amz-Expires=60",
     "https://bucket.s3.amazonaws.com/o?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
    ("postgresql://reader:hunter2@db.internal:5432/kb", "postgresql://reader:***@db.internal:5432/kb"),
    ("https://u:p%40ss@h/x?token=t#access_token=frag&state=s", "https://u:***@h/x?token=***#access_token=***&state=s"),
])
def test_secrets_are_replaced(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", [
    # negative controls: nothing secret, so nothing changes (not even the encoding)
    "https://api.example.com/v1/items?page=2&q=a+b%20c&monkey=1&keyword=x&sort=-id",
    "postgresql://reader@db.internal/kb",
    "sqlite:///data/kb.db",
    # references are names, not values: kept, so the user sees which variable to fix
    "${env:PG_URL}",
    "postgresql://reader:${env:PGPASS}@db/kb",
    "https://h/x?token=${env:API_TOKEN}&page=1",
    "https://h/x?token=",  # an empty value holds nothing to hide
])
def test_nothing_secret_is_left_as_written(url):
    assert redact_url(url) == url


def test_unparseable_url_hides_all_but_the_scheme():
    assert redact_url("http://[::1/x?token=abc") == "http://***"


def test_url_secrets_are_what_redact_url_hides():
    url = "postgresql://reader:p%40ss-word@db/kb?sslkey=x&password=s3cr3t+value&application_name=raylab"
    assert set(url_secrets(url)) == {"p%40ss-word", "p@ss-word", "s3cr3t+value", "s3cr3t value"}
    assert url_secrets("https://h/x?token=${env:T}&page=2") == []  # a reference hides nothing
    assert url_secrets("sqlite:///kb.db") == []


def test_scrub_replaces_secret_values_in_text():
    message = "URL can't contain control characters. '/x?api_key=s3cr3t value&team=acme-corp' (found ' ')"
    assert scrub(message, ["s3cr3t value", "acme-corp"]) == (
        "URL can't contain control characters. '/x?api_key=***&team=***' (found ' ')")
    assert scrub(message, []) == message  # negative control: nothing given, nothing changed
    assert scrub("a pw in a message", ["pw", ""]) == "a pw in a message"  # too short to hide anything
