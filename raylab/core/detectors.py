"""PII redaction: typed placeholders, pluggable detectors.

    text, counts = redact("mail bob@acme.com", detectors(["EMAIL"]))
    # -> "mail <EMAIL>", {"EMAIL": 1}

A detector is a name (its placeholder is `<NAME>`), a regex, and an optional validator
that must accept the match (Luhn for card numbers, mod-97 for IBANs), so ordinary numbers,
dates and version strings are left alone. Add one with `register(Detector(...))`; the
config (`data.pii.types`) chooses which run. Detectors run in registration order, and a
span already replaced is not matched again (placeholders contain no digits or '@').
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: re.Pattern
    validate: Callable[[str], bool] | None = None
    group: int = 0  # redact only this group (e.g. the value of `api_key=...`)
    label: str | None = None  # the PII type counted and shown; default the name

    @property
    def kind(self) -> str:
        return self.label or self.name

    @property
    def placeholder(self) -> str:
        return f"<{self.kind}>"


def luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


_REGISTRY: dict[str, Detector] = {}


def register(detector: Detector) -> None:
    """Add (or replace) a detector; later issues add more (names, addresses, ...)."""
    _REGISTRY[detector.name] = detector


def available() -> list[str]:
    return list(_REGISTRY)


def detectors(names: list[str] | None = None) -> list[Detector]:
    if names is None:
        return list(_REGISTRY.values())
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown PII types {unknown}; available: {', '.join(_REGISTRY)}")
    return [_REGISTRY[n] for n in names]


def redact(text: str, active: list[Detector]) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    for det in active:
        def sub(m: re.Match, det: Detector = det) -> str:
            value = m.group(det.group)
            if det.validate is not None and not det.validate(value):
                return m.group(0)
            counts[det.kind] = counts.get(det.kind, 0) + 1
            if det.group == 0:
                return det.placeholder
            start, end = m.span(det.group)
            return m.group(0)[: start - m.start()] + det.placeholder + m.group(0)[end - m.start():]

        text = det.pattern.sub(sub, text)
    return text, counts


# Order matters: secrets and structured numbers before the looser phone pattern.
register(Detector("SECRET", re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"                  # OpenAI/Stripe-style keys
    r"|\bAKIA[0-9A-Z]{16}\b"                               # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"                     # GitHub tokens
    r"|\bxox[abpr]-[A-Za-z0-9-]{10,}"                      # Slack tokens
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs
)))
register(Detector("SECRET_ASSIGNMENT", re.compile(
    r"(?i)\b(?:api[_-]?key|secret|token|password|passwd)\b\s*[:=]\s*[\"']?([^\s\"']{8,})"
), group=1, label="SECRET"))
register(Detector("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")))
register(Detector("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), iban_ok))
register(Detector("CREDIT_CARD", re.compile(r"(?<![\d.-])\d{4}(?:[ -]?\d{4}){2}(?:[ -]?\d{1,7})?(?![\d-]|\.\d)"), luhn_ok))
register(Detector("US_SSN", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")))
register(Detector("IP_ADDRESS", re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\d|\.\d)"
    r"|\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b"
)))
# Phones need visible phone structure: a +country code, or (area) / 3-3-4 groups with
# separators. Bare digit runs, dates (2026-11-24) and versions (2.60.0) do not match.
register(Detector("PHONE", re.compile(
    r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\d-])"
    r"|(?<![\w(])\(\d{3}\) ?\d{3}[ .-]\d{4}(?![\d-])"
    r"|(?<![\w.-])\d{3}[.-]\d{3}[.-]\d{4}(?![\w-]|\.\d)"
)))
