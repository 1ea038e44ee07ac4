"""Canonical JSON (RFC 8785, the JSON Canonicalization Scheme) for hashing audit entries.

    canonical.dumps({"b": 1, "a": [1.5, "x"]}) == b'{"a":[1.5,"x"],"b":1}'
    canonical.normalise(fields)   # what an event's fields become before they are hashed and stored

The subset implemented, and where it differs from the RFC:
- objects: keys sorted by their UTF-16 code units (RFC 8785 section 3.2.3), no whitespace;
- strings: UTF-8; `"` and `\\` escaped, control characters as \\b \\t \\n \\f \\r or \\u00xx
  (lowercase hex), everything else literal (section 3.2.2.2); a string that is not valid
  Unicode (a lone surrogate) is refused;
- numbers: floats in ECMAScript's shortest round-trip form (`1e+21`, `1e-7`, `0.1`, `2` for
  2.0), as section 3.2.2.3 requires; NaN and infinities are refused (normalise turns them into
  the strings "NaN", "Infinity", "-Infinity" first). **Difference:** integers are written
  exactly in decimal, also beyond 2**53, where the RFC would first round them to a double;
  raylab's entries hold no such integers from outside, and exactness is what a hash wants;
- true, false, null as themselves; arrays in order.
Hand-written rather than a dependency: the few PyPI packages for JCS are unmaintained, and
the rules are short enough to hold in view here (tests/unit/core/test_audit_canonical.py
checks the RFC's own examples).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_REPR = re.compile(r"^(\d+)(?:\.(\d+))?(?:e([+-]\d+))?$")


def dumps(value: Any) -> bytes:
    """The canonical UTF-8 encoding of a JSON value (dict, list, str, int, float, bool, None)."""
    out: list[str] = []
    _write(value, out)
    return "".join(out).encode("utf-8")


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(number(value))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"canonical JSON: object keys must be strings, got {key!r}")
        out.append("{")
        for i, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"canonical JSON: {type(value).__name__} is not a JSON value")


def _string(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"canonical JSON: {s[:40]!r} is not valid Unicode (a lone surrogate)") from None
    # json.dumps with ensure_ascii=False escapes exactly RFC 8785's set, in its lowercase form.
    return json.dumps(s, ensure_ascii=False)


def number(x: float) -> str:
    """ECMAScript's Number.prototype.toString for a finite double (RFC 8785 section 3.2.2.3)."""
    if not math.isfinite(x):
        raise ValueError(f"canonical JSON: {x} is not a JSON number")
    if x == 0:
        return "0"  # -0 too
    sign = "-" if x < 0 else ""
    intpart, frac, exp = _REPR.match(repr(abs(x))).groups()  # repr: the shortest round-trip digits
    raw = intpart + (frac or "")
    digits = raw.lstrip("0")
    n = len(intpart) + int(exp or 0) - (len(raw) - len(digits))  # value = 0.DIGITS * 10**n
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{sign}{mantissa}e{'+' if e > 0 else '-'}{abs(e)}"


def normalise(value: Any) -> Any:
    """A JSON value that round-trips through storage unchanged: tuples become lists, non-finite
    floats the strings "NaN"/"Infinity"/"-Infinity", non-string keys and other objects their
    str(), invalid Unicode is replaced. Hash and store what this returns."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8") if _has_surrogate(value) else value
    if isinstance(value, dict):
        return {normalise(str(k)): normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return normalise(str(value))


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
