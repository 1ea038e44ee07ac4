"""`raylab audit verify`: walk the chain and check it against the signed checkpoints.

What each finding means (`Problem.reason`):
- edited: an entry's content no longer matches its stored hash;
- replaced: an entry whose hash was recomputed after an edit (the next entry's link names
  a different entry), or entries deleted and the rest renumbered;
- deleted: entries missing from the sequence (the next entry links to one no longer there);
- reordered: an entry stored before the entry its link names;
- truncated: the log is shorter than a signed checkpoint says it was;
- rewritten: the chain is consistent, but entry N's hash is not the one a checkpoint signed
  for length N (someone without the key rebuilt the chain);
- forged-checkpoint: a checkpoint whose signature does not verify with a trusted key;
- unsigned: entries exist but no valid checkpoint covers any of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from raylab.core.audit import chain, keys
from raylab.core.audit.settings import Settings


@dataclass(frozen=True)
class Problem:
    entry: int
    reason: str
    message: str


@dataclass
class Report:
    entries: int = 0
    head: str = chain.GENESIS
    checkpoints: int = 0           # valid ones
    latest_checkpoint: int = 0     # the largest length a valid checkpoint signs
    key_ids: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned_tail(self) -> int:
        """Entries after the newest valid checkpoint (a crash between commit and signing, or
        entries appended by someone without the key)."""
        return max(0, self.entries - self.latest_checkpoint)


def verify(settings: Settings, public_keys: list[str] | tuple[str, ...] = ()) -> Report:
    """Check the chain in `settings.database` against the checkpoints in `settings.checkpoints`."""
    rows = chain.rows(settings)
    trusted = keys.trusted_keys(settings.key, public_keys, settings.kms_key)
    report = Report(entries=len(rows), head=rows[-1].hash if rows else chain.GENESIS, key_ids=sorted(trusted))
    report.problems += _links(rows)
    report.problems += _checkpoints(rows, settings.checkpoints, trusted, report)
    report.problems.sort(key=lambda p: (p.entry, p.reason))
    return report


def _links(rows: list) -> list[Problem]:
    problems = []
    position = {r.hash: i for i, r in enumerate(rows)}
    expected, prev_seq = chain.GENESIS, 0
    for i, row in enumerate(rows):
        found = None
        if row.prev_hash != expected:
            j = position.get(row.prev_hash)
            if j is not None and j >= i:
                found = Problem(row.seq, "reordered", f"entry {row.seq} is stored before entry {rows[j].seq}, "
                                f"but its previous-hash link names entry {rows[j].seq}: entries were reordered")
            elif row.seq > prev_seq + 1:
                gap = f"{prev_seq + 1}" if row.seq == prev_seq + 2 else f"{prev_seq + 1}..{row.seq - 1}"
                found = Problem(prev_seq + 1, "deleted", f"entr{'y' if '.' not in gap else 'ies'} {gap} deleted: "
                                f"entry {row.seq} links to an entry no longer in the log")
            else:
                found = Problem(prev_seq, "replaced", f"entry {prev_seq} was replaced (its hash was recomputed after "
                                f"an edit) or entries before {row.seq} were deleted and renumbered: entry {row.seq}'s "
                                f"previous-hash link names a different entry {prev_seq}")
        if found is None:
            try:
                intact = chain.entry_hash(chain.body_of(row)) == row.hash
            except (ValueError, TypeError):  # fields no longer JSON, a type changed
                intact = False
            if not intact:
                found = Problem(row.seq, "edited", f"entry {row.seq} was edited: its content no longer matches "
                                f"its hash ({row.kind} at {row.time})")
        if found is not None:
            problems.append(found)
        expected, prev_seq = row.hash, row.seq
    return problems


def _checkpoints(rows: list, location: str, trusted: dict, report: Report) -> list[Problem]:
    problems, valid = [], []
    for path, record in keys.read_checkpoints(location):
        if record is None or not keys.signature_ok(record, trusted):
            length = record.get("length") if isinstance(record, dict) else None
            at = length if isinstance(length, int) and length > 0 else 1
            problems.append(Problem(at, "forged-checkpoint", f"checkpoint {path} does not verify with the audit key "
                                    f"({', '.join(sorted(trusted))}): forged or damaged"))
        else:
            valid.append(record)
    report.checkpoints = len(valid)
    by_length: dict[int, dict] = {}
    for record in valid:
        by_length[int(record["length"])] = record
    in_log = [n for n in by_length if n <= len(rows)]
    for n in sorted(in_log):
        if rows[n - 1].hash != by_length[n]["head"]:
            problems.append(Problem(n, "rewritten", f"entry {n} is not the entry checkpoint {n} signed "
                                    f"(at {by_length[n].get('time')}): the chain was rewritten from entry {n} on "
                                    "or earlier, without the signing key"))
            break  # every later checkpoint differs too
    beyond = [n for n in by_length if n > len(rows)]
    if beyond:
        n = max(beyond)
        problems.append(Problem(len(rows) + 1, "truncated", f"truncated since checkpoint {n}: the log ends at entry "
                                f"{len(rows)}, but checkpoint {n} (signed at {by_length[n].get('time')}) covers {n} entries"))
    report.latest_checkpoint = max(in_log, default=0)
    if rows and not by_length:
        problems.append(Problem(1, "unsigned", f"no valid signed checkpoint under {location} for a log of {len(rows)} "
                                "entries: truncation and rewriting cannot be ruled out (the checkpoints were deleted, "
                                "or they are written elsewhere: --checkpoints / governance.audit.checkpoints)"))
    return problems


def as_json(report: Report) -> str:
    return json.dumps({"ok": report.ok, "entries": report.entries, "head": report.head,
                       "checkpoints": report.checkpoints, "latest_checkpoint": report.latest_checkpoint,
                       "unsigned_tail": report.unsigned_tail, "key_ids": report.key_ids,
                       "problems": [p.__dict__ for p in report.problems]}, indent=2)
