"""PII and secret redaction: typed placeholders, pluggable detectors.

    text, counts = redact("mail bob@acme.com", detectors(["EMAIL"]))
    # -> "mail <EMAIL>", {"EMAIL": 1}
    active = detectors(None, regions=["DE"])          # every type; national phones as in Germany
    redact("Hi, this is Sam Rivera", active, Pseudonyms.new())   # -> "Hi, this is <PERSON_QZKD>"

A detector is a name (its placeholder is `<NAME>`) and either a regex with an optional
validator that must accept the match (Luhn for card numbers, mod-97 for IBANs), or a `find`
function returning (start, end) spans (the recognisers in `pii_rules` and `pii_names`, built
on phonenumbers, usaddress, detect-secrets and a name list). Add one with
`register(Detector(...))`; the config (`data.pii.types`) chooses which run. Detectors run in
registration order, and a span touching a placeholder already written is not matched again
(placeholders contain no digits, '@' or lower-case letters).

Types: SECRET, EMAIL, IBAN, CREDIT_CARD, US_SSN, PASSPORT, ID_NUMBER, DATE_OF_BIRTH,
IP_ADDRESS, PHONE, ADDRESS, PERSON. `Pseudonyms` turns a placeholder into `<PERSON_QZKD>`:
the same value gets the same letters within a run (a keyed hash with a key drawn per run and
never written), so a conversation that names a customer twice stays coherent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from raylab.core import pii_names, pii_rules

Span = tuple[int, int]
DEFAULT_REGIONS = pii_rules.DEFAULT_REGIONS
valid_region = pii_rules.valid_region


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: re.Pattern | None = None
    validate: Callable[[str], bool] | None = None
    group: int = 0  # redact only this group (e.g. the value of `api_key=...`)
    label: str | None = None  # the PII type counted and shown; default the name
    find: Callable[[str], Iterable[Span]] | None = None  # spans, instead of pattern + validate

    @property
    def kind(self) -> str:
        return self.label or self.name

    @property
    def placeholder(self) -> str:
        return f"<{self.kind}>"

    def spans(self, text: str) -> list[Span]:
        if self.find is not None:
            return list(self.find(text))
        out = []
        for m in self.pattern.finditer(text):
            if self.validate is None or self.validate(m.group(self.group)):
                out.append(m.span(self.group))
        return out


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


class Pseudonyms:
    """`<KIND_ABCD>` per value: four letters of an HMAC of the normalised value under a key
    drawn once per run (never written anywhere), so equal values get equal placeholders
    within the run and nobody can confirm a guessed value from a placeholder afterwards.
    Letters only: later detectors cannot re-match a placeholder."""

    def __init__(self, key: bytes):
        self.key = key

    @classmethod
    def new(cls) -> Pseudonyms:
        return cls(secrets.token_bytes(32))

    def __call__(self, kind: str, value: str) -> str:
        norm = re.sub(r"\W+", "", value.casefold())
        digest = hmac.new(self.key, f"{kind}\0{norm}".encode(), hashlib.sha256).digest()
        return f"<{kind}_{''.join(chr(65 + b % 26) for b in digest[:4])}>"


PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*>")

_REGISTRY: dict[str, Detector] = {}


def register(detector: Detector) -> None:
    """Add (or replace) a detector."""
    _REGISTRY[detector.name] = detector


def available() -> list[str]:
    return list(_REGISTRY)


def detectors(names: list[str] | None = None, regions: list[str] | None = None) -> list[Detector]:
    """The named detectors (default all) in registration order. `regions` (ISO 3166 codes)
    are the countries whose national phone formats count (+country numbers always do)."""
    if names is not None:
        unknown = [n for n in names if n not in _REGISTRY]
        if unknown:
            raise ValueError(f"unknown PII types {unknown}; available: {', '.join(_REGISTRY)}")
    chosen = [d for n, d in _REGISTRY.items() if names is None or n in names]
    if regions is not None:
        chosen = [dataclasses.replace(d, find=pii_rules.PhoneFinder(regions)) if d.name == "PHONE" else d
                  for d in chosen]
    return chosen


def for_engine(names: list[str] | None, engine: str = "builtin", regions: list[str] | None = None) -> list[Detector]:
    """`detectors(names, regions)`, with the types Presidio covers found by Presidio when
    `engine` is "presidio" (raylab/core/pii_presidio.py; the rest stay builtin)."""
    active = detectors(names, regions)
    if engine == "builtin":
        return active
    from raylab.core import pii_presidio

    finder = pii_presidio.Finder(regions or DEFAULT_REGIONS)
    covered = finder.covered()
    return [dataclasses.replace(d, pattern=None, validate=None, group=0, find=finder.spans(d.kind))
            if d.kind in covered and d.name != "SECRET_ASSIGNMENT" else d for d in active]


def _free(spans: list[Span], taken: list[Span]) -> list[Span]:
    """The spans that overlap neither a placeholder nor an earlier span of this detector."""
    out: list[Span] = []
    for s, e in sorted(set(spans)):
        if e <= s or any(s < te and ts < e for ts, te in taken):
            continue
        if out and s < out[-1][1]:
            continue
        out.append((s, e))
    return out


def find_all(text: str, active: list[Detector]) -> list[tuple[str, int, int]]:
    """(kind, start, end) of everything `active` finds in `text`, without redacting: what
    the benchmark scores. Earlier detectors win overlaps, as in `redact`."""
    found: list[tuple[str, int, int]] = []
    for det in active:
        for s, e in _free(det.spans(text), [(s, e) for _, s, e in found]):
            found.append((det.kind, s, e))
    return sorted(found, key=lambda f: f[1])


def redact(text: str, active: list[Detector],
           pseudonyms: Callable[[str, str], str] | None = None) -> tuple[str, dict[str, int]]:
    """`text` with every finding replaced by its placeholder, and the count per type."""
    counts: dict[str, int] = {}
    for det in active:
        taken = [m.span() for m in PLACEHOLDER.finditer(text)]
        spans = _free(det.spans(text), taken)
        for s, e in reversed(spans):
            value = text[s:e]
            placeholder = pseudonyms(det.kind, value) if pseudonyms else det.placeholder
            text = text[:s] + placeholder + text[e:]
        if spans:
            counts[det.kind] = counts.get(det.kind, 0) + len(spans)
    return text, counts


# Order matters: secrets and structured numbers first, then context-bound identifiers, the
# phone numbers (a loose shape), addresses (a house number), and names last.
register(Detector("SECRET", find=pii_rules.find_secrets))
register(Detector("SECRET_ASSIGNMENT", re.compile(
    r"(?i)\b(?:api[_-]?key|secret|token|password|passwd|pwd)\b\s*[:=]\s*[\"']?([^\s\"']{8,})"
), group=1, label="SECRET"))
register(Detector("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")))
register(Detector("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), iban_ok))
register(Detector("CREDIT_CARD", re.compile(r"(?<![\d.-])\d{4}(?:[ -]?\d{4}){2}(?:[ -]?\d{1,7})?(?![\d-]|\.\d)"), luhn_ok))
register(Detector("US_SSN", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")))
register(Detector("PASSPORT", find=pii_rules.find_passports))
register(Detector("ID_NUMBER", find=pii_rules.find_id_numbers))
register(Detector("DATE_OF_BIRTH", find=pii_rules.find_dates_of_birth))
register(Detector("IP_ADDRESS", find=pii_rules.find_ip_addresses))
register(Detector("PHONE", find=pii_rules.PhoneFinder(pii_rules.DEFAULT_REGIONS)))
register(Detector("ADDRESS", find=pii_rules.find_addresses))
register(Detector("PERSON", find=pii_names.find_names))
