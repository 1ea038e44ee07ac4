"""The audit log's table, appends and queries.

An entry is `{seq, prev, time, kind, actor, actor_kind, run, model, version, fields}`; its
`hash` is sha256 over the canonical JSON (canonical.py) of exactly those keys, so it commits
to its position (`seq`) and to the whole chain before it (`prev`, the previous entry's hash;
64 zeros for the first). `actor_kind` says who `actor` is: `os-user` (user@host, what the CLI
and the pipeline record) or, later, an identity authenticated by the API.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import sqlalchemy as sa

from raylab.core import controldb
from raylab.core.audit import canonical, keys
from raylab.core.audit.settings import Settings

GENESIS = "0" * 64
FIELDS = ("seq", "prev", "time", "kind", "actor", "actor_kind", "run", "model", "version", "fields")

metadata = sa.MetaData()
# Mirrors migrations/versions/0001_audit_log.py (the schema's source of truth).
audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("prev_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("actor_kind", sa.String(32), nullable=False),
    sa.Column("run", sa.Text),
    sa.Column("model", sa.String(255)),
    sa.Column("version", sa.String(64)),
    sa.Column("fields", sa.Text, nullable=False),
)


def entry_hash(body: dict) -> str:
    return hashlib.sha256(canonical.dumps({k: body[k] for k in FIELDS})).hexdigest()


def body_of(row) -> dict:
    """The hashed body of a stored row (its `fields` parsed back from canonical JSON)."""
    return {"seq": row.seq, "prev": row.prev_hash, "time": row.time, "kind": row.kind, "actor": row.actor,
            "actor_kind": row.actor_kind, "run": row.run, "model": row.model, "version": row.version,
            "fields": json.loads(row.fields)}


def as_dict(row) -> dict:
    """An entry as `raylab audit log --json` and `export` print it (hashes included, so a SIEM
    can re-check the chain)."""
    return {**body_of(row), "hash": row.hash}


def append(record: dict, settings: Settings) -> dict:
    """Append one event (core.events' record) to the chain, then sign a checkpoint of the new
    head. Appends from any number of processes form one chain (controldb.write_transaction)."""
    eng = controldb.engine(settings.database)
    fields = canonical.normalise(record.get("fields") or {})
    # The signer first: an entry must not land when its checkpoint cannot be signed.
    if settings.kms_key:
        keys.kms_public(settings.kms_key)
    else:
        keys.private_key(settings.key)
    with controldb.write_transaction(eng, "raylab.audit") as conn:
        head = conn.execute(sa.select(audit_log.c.seq, audit_log.c.hash)
                            .order_by(audit_log.c.seq.desc()).limit(1)).first()
        body = {"seq": head.seq + 1 if head else 1, "prev": head.hash if head else GENESIS,
                "time": str(record["time"]), "kind": str(record["kind"]), "actor": str(record["actor"]),
                "actor_kind": str(record.get("actor_kind") or "os-user"),
                "run": _opt(record.get("run")), "model": _opt(record.get("model")),
                "version": _opt(record.get("version")), "fields": fields}
        body["hash"] = entry_hash(body)
        conn.execute(sa.insert(audit_log).values(
            seq=body["seq"], prev_hash=body["prev"], hash=body["hash"], time=body["time"], kind=body["kind"],
            actor=body["actor"], actor_kind=body["actor_kind"], run=body["run"], model=body["model"],
            version=body["version"], fields=canonical.dumps(fields).decode("utf-8")))
    # After the commit: a checkpoint must never name an entry that a failed commit left out.
    keys.write_checkpoint(settings.checkpoints, settings.key, body["seq"], body["hash"], settings.kms_key)
    return body


def _opt(value) -> str | None:
    return None if value is None else str(value)


@dataclass
class Filter:
    """`raylab audit log|export` filters; times are ISO 8601 UTC strings as entries store them."""

    since: str | None = None
    until: str | None = None
    actors: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    limit: int | None = None  # the newest `limit` entries (still printed oldest first)

    def where(self):
        c = audit_log.c
        clauses = []
        if self.since:
            clauses.append(c.time >= self.since)
        if self.until:
            clauses.append(c.time < self.until)
        if self.actors:  # `ada` matches ada@host; `ada@host` matches itself
            clauses.append(sa.or_(*(sa.or_(c.actor == a, c.actor.like(_like(a) + "@%", escape="\\"))
                                    for a in self.actors)))
        if self.kinds:  # `registry` matches registry.promote, registry.rollback, ...
            clauses.append(sa.or_(*(sa.or_(c.kind == k, c.kind.like(_like(k) + ".%", escape="\\"))
                                    for k in self.kinds)))
        if self.models:  # NAME, or NAME/VERSION
            parts = []
            for m in self.models:
                name, _, version = m.partition("/")
                parts.append(sa.and_(c.model == name, c.version == version) if version else c.model == name)
            clauses.append(sa.or_(*parts))
        return sa.and_(sa.true(), *clauses)


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def entries(settings: Settings, flt: Filter | None = None) -> Iterator[dict]:
    """The entries matching `flt`, oldest first."""
    flt = flt or Filter()
    eng = controldb.engine(settings.database, create=False)
    query = sa.select(audit_log).where(flt.where())
    if flt.limit:
        query = query.order_by(audit_log.c.seq.desc()).limit(flt.limit)
        with eng.connect() as conn:
            rows = list(conn.execute(query))
        yield from (as_dict(r) for r in reversed(rows))
        return
    with eng.connect() as conn:
        for row in conn.execution_options(yield_per=1000).execute(query.order_by(audit_log.c.seq)):
            yield as_dict(row)


def rows(settings: Settings) -> list:
    """Every stored row in `seq` order (what verify walks)."""
    eng = controldb.engine(settings.database, create=False)
    with eng.connect() as conn:
        return list(conn.execute(sa.select(audit_log).order_by(audit_log.c.seq)))


def parse_time(value: str, flag: str) -> str:
    """A --since/--until value as the stored form (ISO 8601 UTC, milliseconds): an ISO date or
    date-time (no zone means UTC), or an age such as 30m, 12h, 7d (that long before now)."""
    import datetime
    import re

    from raylab.errors import UserError

    now = datetime.datetime.now(datetime.timezone.utc)
    m = re.fullmatch(r"(\d+)([smhdw])", value.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
        when = now - datetime.timedelta(**{unit: int(m.group(1))})
    else:
        try:
            when = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise UserError(f"{flag} {value!r}: expected an ISO date or time (2026-12-01, 2026-12-01T09:30, "
                            "2026-12-01T09:30+01:00) or an age (30m, 12h, 7d)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds")
