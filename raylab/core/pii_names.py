"""Person names: a name list plus context rules, offline and a few MB per process.

    find_names("Hi, this is Sam Rivera. Thanks, Sam")    # [(12, 22), (32, 35)]

The list (`names.tsv.gz`, built by scripts/build_names.py from names-dataset's most
frequent first and last names per country, and english-words' web2 list) marks each word F
(a first name), L (a last name) and W (an ordinary English word: Will, May, Rose, Grant,
Bill as names and words; Rockets, Policy as words only). A capitalised sequence is a name:

- after a strong cue, whatever it holds: "my name is", "name:", Mr/Mrs/Ms/Dr, "Dear", a
  sign-off on its own line ("Regards,\\n", "Thanks,\\n", "Sincerely,\\n") followed by the name;
- after a weak cue ("this is", "I'm", "I am", "Hi", "Hello", "Thanks,", "ask", "contact",
  "spoke to", "cc", ...) when its first word is a listed first name, or a listed last name
  that is no ordinary word, or when it is two or more words none of which is an ordinary
  word ("this is Zorblat Quenkvist" yes, "this is Acme Rockets" no);
- with no cue when it is a first name followed by a last name from the list, unless both are
  ordinary English words at the start of a sentence ("Sam Rivera" yes, "... asked Will
  Grant" yes, "Will Grant the request?" no, "May Rose" no);

and once a name is found, its other words (not W) elsewhere in the text are names too.
A sequence is up to three capitalised words with particles (van, de, von, ...) between.
Names outside the list are found through the cues only; the benchmark measures both.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import regex as re  # \p{Lu}: capitals of every script's Latin letters (Štěpánek, Đặng, İdiris)

NAMES_FILE = Path(__file__).with_name("names.tsv.gz")

_WORD = r"\p{Lu}[\p{Ll}\p{M}]+(?:['-]\p{Lu}?[\p{Ll}\p{M}]+)?"
_PARTICLE = r"(?:van|von|de|der|den|da|di|del|della|du|la|le|bin|ibn|al|el|ter|ten|dos|das)"
_SEQ = rf"{_WORD}(?:[ \t]+(?:{_PARTICLE}[ \t]+)?{_WORD}){{0,2}}"
_STRONG = re.compile(
    rf"(?:(?i:\bmy\s+name\s+is|\bmy\s+name's|\bname\s*:|\bcalled|\bsigned)\s+"
    rf"|\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Herr|Frau|Mme|Mlle|Sr|Sra)\.?[ \t]+"
    rf"|(?:^|\n)[ \t]*(?:Dear|Liebe|Lieber|Sehr geehrte[r]?)[ \t]+(?:(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Herr|Frau)\.?[ \t]+)?"
    rf"|(?i:regards|sincerely|best|thanks|thank\s+you|cheers|best\s+wishes|kind\s+regards|mfg|gruß|grüße|"
    rf"viele\s+grüße|cordialement|saludos)[ \t]*,?[ \t]*\n[ \t]*(?:-+[ \t]*)?)({_SEQ})"
)
_WEAK = re.compile(
    rf"(?:(?i:\bthis\s+is|\bit's|\bi'm|\bi\s+am|\bhi|\bhello|\bhey|\bthanks|\bthank\s+you|\bregards|\bcheers|"
    rf"\bask|\bcontact|\bspoke\s+(?:to|with)|\bcc|\bhallo|\bich\s+bin|\bbonjour|\bhola|\bje\s+suis|\bsoy|"
    rf"\bforwarded\s+by|\bcustomer|\bclient|\bagent|\bcaller)[ \t]*[,:-]?[ \t]+)({_SEQ})"
)
_PAIR = re.compile(rf"(?<![\w'-])({_SEQ})")
# Capitalised words that follow a cue but are never names (a month, a weekday, a salutation).
_NEVER = {
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "January", "February", "March",
    "April", "May", "June", "July", "August", "September", "October", "November", "December", "Team", "All",
    "Everyone", "There", "Support", "Sir", "Madam", "Customer", "Service", "Sales", "Admin", "Acme",
}


@functools.lru_cache(maxsize=1)
def names() -> dict[str, str]:
    """Word -> flags (F, L, W), loaded once per process (about 30 MB)."""
    with gzip.open(NAMES_FILE, "rt", encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)


def _listed(flags: str) -> bool:
    return "F" in flags or "L" in flags


def _words(seq: str) -> list[str]:
    return [w for w in re.split(r"[ \t]+", seq) if not re.fullmatch(_PARTICLE, w)]


def _trim(seq: str, table: dict[str, str]) -> str:
    """Cut a sequence after its second name word unless the words after it are listed names,
    so "Sam Rivera Thanks" keeps "Sam Rivera" and "Ruben van Rooij" stays whole (a following
    capitalised word is often a new sentence)."""
    words = seq.split()
    keep, names = 1, 1
    for i, w in enumerate(words[1:], 1):
        if re.fullmatch(_PARTICLE, w):
            continue
        if (names == 1 and w not in _NEVER) or _listed(table.get(w, "")):
            keep, names = i + 1, names + 1
        else:
            break
    return " ".join(words[:keep])


def find_names(text: str) -> list[tuple[int, int]]:
    table = names()
    spans: list[tuple[int, int]] = []

    def add(start: int, seq: str, strong: bool = False) -> None:
        seq = _trim(seq, table)
        if strong or seq.split()[0] not in _NEVER:  # "My name is August Hande" is a name
            spans.append((start, start + len(seq)))

    for m in _STRONG.finditer(text):
        add(m.start(1), m.group(1), strong=True)
    for m in _WEAK.finditer(text):
        words = _words(_trim(m.group(1), table))
        flags = table.get(words[0], "")
        unknown_pair = len(words) >= 2 and not any("W" in table.get(w, "") for w in words)
        if "F" in flags or ("L" in flags and "W" not in flags) or unknown_pair:
            add(m.start(1), m.group(1))
    for m in _PAIR.finditer(text):
        words = _words(m.group(1))
        for i in range(len(words) - 1):
            first, last = table.get(words[i], ""), table.get(words[i + 1], "")
            if "W" in first and i + 2 < len(words) and "F" in last and "L" in table.get(words[i + 2], ""):
                continue  # "Yesterday Julia Wagner": the word before a first + last name
            start = m.start(1) + m.group(1).index(words[i])
            initial = re.search(r"(?:^|[.!?:;\n\"(])\s*$", text[max(0, start - 8):start]) is not None
            if "F" in first and "L" in last and not ("W" in first and "W" in last and initial):
                end = m.start(1) + m.group(1).index(words[i + 1], start - m.start(1)) + len(words[i + 1])
                spans.append((start, end))
                break
    # The other mentions of a found name's words ("... Rivera here again").
    found = {w for s, e in spans for w in _words(text[s:e]) if "W" not in table.get(w, "") and len(w) > 2}
    for w in found:
        for m in re.finditer(rf"(?<![\w'-]){re.escape(w)}(?![\w'-])", text):
            spans.append(m.span())
    return _merge(spans)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
