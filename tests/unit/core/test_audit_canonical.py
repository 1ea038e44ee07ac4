"""Canonical JSON (RFC 8785) for audit hashes: the RFC's own examples, and what raylab adds
(normalising NaN, refusing what JSON cannot hold)."""

from __future__ import annotations

import json
import struct

import pytest

from raylab.core.audit import canonical

# RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
RFC_NUMBERS = [
    ("0000000000000000", "0"), ("8000000000000000", "0"), ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"), ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"), ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"), ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"), ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"), ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"), ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"), ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"), ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"), ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"), ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize("bits,text", RFC_NUMBERS)
def test_numbers_follow_the_rfc_appendix(bits, text):
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert canonical.number(value) == text
    assert float(text) == value or (value == 0 and float(text) == 0)  # it still round-trips


def test_the_rfc_serialization_example():
    # RFC 8785 section 3.2.3's input, as a parser would hand it over.
    parsed = json.loads('{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001], '
                        '"string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/", '
                        '"literals": [null, true, false]}')
    expected = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
                '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}')
    assert canonical.dumps(parsed) == expected.encode("utf-8")


def test_keys_sort_by_utf16_code_units():
    # RFC 8785 section 3.2.3's sorting example: the emoji (a surrogate pair, D83D) sorts
    # before U+FB33, though its code point is larger; Python's own sort would put it last.
    obj = {"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
           "1": "One", "\U0001F600": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "o umlaut"}
    keys = list(json.loads(canonical.dumps(obj)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001F600", "\ufb33"]
    assert keys != sorted(obj)  # negative control: a code-point sort differs here


def test_no_whitespace_and_integers_exact():
    assert canonical.dumps({"b": [1, 2], "a": {"y": None, "x": True}}) == b'{"a":{"x":true,"y":null},"b":[1,2]}'
    assert canonical.dumps(2**64 + 1) == b"18446744073709551617"  # the documented difference: exact
    assert canonical.dumps(2.0) == b"2" and canonical.dumps(-0.0) == b"0"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: "x"}, object(), "\ud800"])
def test_what_json_cannot_hold_is_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        canonical.dumps(bad)


def test_normalise_makes_values_round_trip():
    raw = {"loss": float("nan"), "big": float("inf"), "t": (1, 2), 3: "three", "obj": ValueError("x"), "s": "a\ud800"}
    norm = canonical.normalise(raw)
    assert norm == {"loss": "NaN", "big": "Infinity", "t": [1, 2], "3": "three", "obj": "x", "s": "a?"}
    text = canonical.dumps(norm)
    assert canonical.dumps(json.loads(text)) == text  # what is stored hashes the same when read back
