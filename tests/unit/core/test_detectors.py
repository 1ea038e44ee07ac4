"""Each PII type is redacted (also at a sentence end); ordinary numbers are not."""

from __future__ import annotations

import re

import pytest

from raylab.core import detectors as pii

ALL = pii.detectors()


@pytest.mark.parametrize(
    "text, kind",
    [
        ("write to jane.doe@example.org", "EMAIL"),
        ("mail ops+alerts@mail.acme.co.uk.", "EMAIL"),
        ("call +1 415 555 0134", "PHONE"),
        ("call +44 20 7946 0958.", "PHONE"),
        ("call (415) 555-0134", "PHONE"),
        ("call 415-555-0134.", "PHONE"),
        ("card 4111 1111 1111 1111.", "CREDIT_CARD"),
        ("card 5500-0000-0000-0004", "CREDIT_CARD"),
        ("card 378282246310005", "CREDIT_CARD"),
        ("IBAN DE89 3704 0044 0532 0130 00.", "IBAN"),
        ("IBAN GB82WEST12345698765432", "IBAN"),
        ("from 192.168.1.20.", "IP_ADDRESS"),
        ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "IP_ADDRESS"),
        ("SSN 123-45-6789.", "US_SSN"),
        ("key sk-live1234567890abcdefXYZ", "SECRET"),
        ("aws AKIAABCDEFGHIJKLMNOP", "SECRET"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "SECRET"),
        ("api_key = 'abcd1234efgh5678'", "SECRET"),
        ("password: hunter2hunter2", "SECRET"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "SECRET"),
    ],
)
def test_each_type_is_redacted(text, kind):
    redacted, counts = pii.redact(text, ALL)
    assert counts == {kind: 1}, (redacted, counts)
    assert f"<{kind}>" in redacted
    assert not re.search(r"\d{4}", redacted.split("<")[0] + redacted.split(">")[-1]) or kind == "PHONE"


@pytest.mark.parametrize(
    "text",
    [
        "Released 2026-11-24 at 12:30, version 2.60.0 (build 1.2.3.4.5).",
        "Order 1234567890 of 100,000 units cost 3,499.00 euros on 24/11/2026.",
        "Room 204, extension 999, 27 vacation days, 16 weeks, 2000 euros, 75 kg.",
        "Ticket 4111-1111-1111-1112 failed the Luhn check; so does 1234 5678 9012 3456.",
        "IBAN-like DE00 0000 0000 0000 0000 00 with a bad checksum.",
        "SSN-like 000-12-3456 and 666-12-3456 are invalid; 10.0.0.256 is no address.",
        "v10.0.0.1 is a version; the tokens field has 512 entries; pi is 3.14159265.",
        "Call the help desk at extension 999 or visit room 204.",
    ],
)
def test_no_false_positives(text):
    assert pii.redact(text, ALL) == (text, {})


def test_detectors_are_pluggable():
    before = pii.available()
    pii.register(pii.Detector("EMPLOYEE_ID", re.compile(r"\bEMP-\d{6}\b")))
    try:
        assert pii.redact("badge EMP-004217 lost", pii.detectors(["EMPLOYEE_ID"])) == ("badge <EMPLOYEE_ID> lost", {"EMPLOYEE_ID": 1})
    finally:
        pii._REGISTRY.pop("EMPLOYEE_ID")
    assert pii.available() == before
    with pytest.raises(ValueError, match="unknown PII types"):
        pii.detectors(["NOPE"])


def test_checksums():
    assert pii.luhn_ok("4111111111111111") and not pii.luhn_ok("4111111111111112")
    assert pii.iban_ok("DE89370400440532013000") and not pii.iban_ok("DE89370400440532013001")
