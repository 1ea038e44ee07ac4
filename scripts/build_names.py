"""Builds raylab/core/names.tsv.gz, the name list the PERSON detector loads (a few MB in
memory, instead of names-dataset's ~3.2 GB per process).

    pip install names-dataset english-words && python scripts/build_names.py   # ~1 min, ~4 GB RAM once

Source: names-dataset (https://github.com/philipperemy/name-dataset), the most frequent
first names (per gender) and last names of every country it covers. Only the name strings
are kept: no person, count or country. Note for a privacy review: names-dataset's lists
were extracted from the 2021 Facebook data dump; replace FIRST/LAST below with another
source (national statistics offices' name lists) if that provenance is unacceptable.

Each line: `Word<TAB>flags`, flags from F (a first name), L (a last name) and W (an ordinary
lower-case English word in english-words' web2 list: Will, May, Rose, Grant, Bill as names
and words, every other web2 word as W alone), which the detector only accepts as a name
beside strong evidence (raylab/core/pii_names.py).
"""

from __future__ import annotations

import gzip
import pickle
import re
from pathlib import Path

TOP_FIRST = 1500  # per country and gender
TOP_LAST = 2500   # per country
OUT = Path(__file__).resolve().parents[1] / "raylab" / "core" / "names.tsv.gz"
# Latin-script names only: the detector's patterns look for capitalised Latin words.
NAME = re.compile(r"^[A-Z\u00C0-\u00DE][a-z\u00DF-\u00FF]+(?:[-'][A-Z\u00C0-\u00DE][a-z\u00DF-\u00FF]+)?$")
# Words that start sentences and greetings, never a name for the detector's purposes.
NEVER = {"Hi", "Hello", "Hey", "Dear", "Thanks", "Thank", "Regards", "Best", "Cheers", "The", "And", "Mr", "Mrs",
         "Ms", "Dr", "Sir", "Madam", "Yes", "No", "Ok", "Okay", "Please", "Love", "Happy", "Good", "God"}


def top(table: dict, limit: int, by_gender: bool) -> set[str]:
    ranked: dict[tuple, list] = {}
    for name, info in table.items():
        if not NAME.match(name) or name in NEVER:
            continue
        genders = info.get("gender") or {}
        g = max(genders, key=genders.get) if by_gender and genders else ""
        for country, rank in (info.get("rank") or {}).items():
            if rank is not None:
                ranked.setdefault((country, g), []).append((rank, name))
    keep = set()
    for pairs in ranked.values():
        keep.update(n for _, n in sorted(pairs)[:limit])
    return keep


def main() -> None:
    import names_dataset
    from english_words import get_english_words_set

    base = Path(names_dataset.__file__).parent / "v3"
    words = {w for w in get_english_words_set(["web2"]) if w.islower()}
    with gzip.open(base / "first_names.pkl.gz", "rb") as f:
        first = top(pickle.load(f), TOP_FIRST, by_gender=True)
    with gzip.open(base / "last_names.pkl.gz", "rb") as f:
        last = top(pickle.load(f), TOP_LAST, by_gender=False)
    lines = []
    for name in sorted(first | last | {w.capitalize() for w in words}):
        flags = ("F" if name in first else "") + ("L" if name in last else "") + ("W" if name.lower() in words else "")
        lines.append(f"{name}\t{flags}\n")
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as f:
        f.writelines(lines)
    print(f"wrote {OUT}: {len(first)} first names, {len(last)} last names, {len(words)} words, {len(lines)} lines")


if __name__ == "__main__":
    main()
