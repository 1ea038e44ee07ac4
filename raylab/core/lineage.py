"""Lineage and erasure records in the control-plane database (core/controldb.py): which data
runs accepted which records, and the suppression list of erased records.

    lineage.index_run(run_dir, manifest_hash, created, [(source, record_id), ...])   # the data stage
    lineage.suppression()                 # what every data run drops (and counts as `erased`)
    lineage.runs_with(record_id="faq.csv:12")      # the data runs that accepted it
    lineage.suppress("faq.csv:12", source="faq", reason="GDPR art. 17 request 4411", versions=[...])

A data run is named by its run directory and its manifest hash (runs.manifest_hash): the hash
is what a registered version records as `data_manifest_hash`, so it joins a record to the model
versions trained on it; re-running a directory with other data makes a second data run. The
index is written when the data stage finishes, so `raylab lineage` never scans run directories.

Record ids are the data stage's (raylab/data/sources/rows.py): file:line for JSON lines and
CSV, sql:<key>, page<N>#<i>; the same id may occur in several sources, so a suppression names
its source, or '' for the id in every source. Ids are positional for files: an id names what
stood at that line when the run read it.

Sealed ids. An SQL key can be personal data (sql:ada@example.com), so with governance.encryption
on, record ids are kept encrypted in `record_index` and `suppressions` (issue 24: "kept,
encrypted when encryption is on"). The cipher is AES-SIV (RFC 5297), deterministic on purpose:
lookups by id, the join from erased records to data runs (`pending_for`) and the primary keys
need equal ids to stay equal, and SIV reveals nothing but that equality. Its key is one data key
per database (`record_keys`, wrapped by the provider's key-encryption key like a sealed file's
header, so `raylab keys rotate` re-wraps it), created by the first encrypting data run or
erasure, which also seals the ids already there: a database holds one form only. From then on
every process that reads or writes ids needs that key (a UserError naming it otherwise); sources
and run paths stay plain.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa

from raylab.core import controldb, crypto
from raylab.errors import UserError

ANY_SOURCE = ""
INSERT_CHUNK = 5000

metadata = sa.MetaData()
# Mirror migrations/versions/0002_lineage.py (the schema's source of truth).
data_runs = sa.Table(
    "data_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run", sa.Text, nullable=False),
    sa.Column("manifest_hash", sa.String(64), nullable=False),
    sa.Column("created", sa.String(40), nullable=False),
    sa.Column("records", sa.Integer, nullable=False),
)
record_index = sa.Table(
    "record_index", metadata,
    sa.Column("data_run", sa.Integer, sa.ForeignKey("data_runs.id"), primary_key=True),
    sa.Column("source", sa.String(255), primary_key=True),
    sa.Column("record_id", sa.String(1024), primary_key=True),
)
suppressions = sa.Table(
    "suppressions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.String(255), nullable=False),
    sa.Column("record_id", sa.String(1024), nullable=False),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("versions", sa.Text, nullable=False),
)
record_keys = sa.Table(  # migrations/versions/0004_record_keys.py
    "record_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("created", sa.String(40), nullable=False),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("kek", sa.Text, nullable=False),
    sa.Column("dek", sa.Text, nullable=False),
)


def _engine(database: str | None, create: bool = True):
    return controldb.engine(controldb.url(database), create=create)


def _exists(database: str | None) -> bool:
    """False only for a SQLite database that was never created (nothing recorded yet)."""
    db = controldb.url(database)
    return not controldb.is_sqlite(db) or os.path.exists(db.removeprefix("sqlite:///"))


# ---------------------------------------------------------------- sealed record ids

SEALED = "rid1:"  # a sealed id's prefix: rid1:<base64url of AES-SIV(id)>
_AAD = [b"raylab.record_id"]


class RecordKey:
    """Seals and opens record ids with the database's record key (AES-SIV)."""

    def __init__(self, dek: bytes):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESSIV
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        # AES-256-SIV takes a 512-bit key; the provider's data keys are 256 bits
        siv_key = HKDF(hashes.SHA256(), 64, salt=None, info=b"raylab record ids").derive(dek)
        self._siv = AESSIV(siv_key)

    def seal(self, record_id: str) -> str:
        sealed = self._siv.encrypt(record_id.encode(), _AAD)
        return SEALED + base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, value: str) -> str:
        if not value.startswith(SEALED):
            return value
        raw = value[len(SEALED):]
        return self._siv.decrypt(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)), _AAD).decode()


_WHERE = "the control-plane database's record ids"


def _record_key(conn, create: bool) -> RecordKey | None:
    """The database's record key: None while ids are plain; made (and the plain ids sealed)
    when `create` and this process encrypts."""
    row = conn.execute(sa.select(record_keys).where(record_keys.c.id == 1)).first()
    if row is not None:
        header = {"provider": row.provider, "kek": row.kek, "dek": row.dek}
        try:
            return RecordKey(crypto.data_key(header, _WHERE))
        except UserError as e:
            raise UserError(f"{e} (--config CONFIG with that governance.encryption)") from None
    settings = crypto.active()
    if not create or settings is None:
        return None
    try:
        dek, kid, wrapped = crypto.provider(settings).wrap(None)
    except KeyError as e:
        raise UserError(f"governance.encryption: cannot make the record-id key: {e.args[0]}") from None
    conn.execute(sa.insert(record_keys).values(id=1, created=_now(), provider=settings.provider, kek=kid,
                                               dek=base64.b64encode(wrapped).decode()))
    key = RecordKey(dek)
    _seal_existing(conn, key)
    return key


def _seal_existing(conn, key: RecordKey) -> None:
    """Seal the ids written before encryption was turned on (one form per database, so equal
    ids keep comparing equal in lookups and joins)."""
    ri, s = record_index, suppressions
    for row in conn.execute(sa.select(ri).where(~ri.c.record_id.startswith(SEALED))).all():
        conn.execute(sa.update(ri).where(ri.c.data_run == row.data_run, ri.c.source == row.source,
                                         ri.c.record_id == row.record_id).values(record_id=key.seal(row.record_id)))
    for row in conn.execute(sa.select(s.c.id, s.c.record_id).where(~s.c.record_id.startswith(SEALED))).all():
        conn.execute(sa.update(s).where(s.c.id == row.id).values(record_id=key.seal(row.record_id)))


def _key_for_reading(conn) -> RecordKey | None:
    return _record_key(conn, create=False)


def _as_stored(key: RecordKey | None, record_id: str) -> str:
    return key.seal(record_id) if key else record_id


def _as_read(key: RecordKey | None, value: str) -> str:
    return key.open(value) if key else value


def as_recorded(record_id: str, database: str | None = None) -> str:
    """The id as the database holds it (sealed when its ids are): what an audit entry about a
    record names, so the audit log holds no more of it than the lineage tables do."""
    if not _exists(database):
        return record_id
    with _engine(database).connect() as conn:
        return _as_stored(_key_for_reading(conn), record_id)


def rewrap_key(settings: crypto.Settings, database: str | None = None) -> str | None:
    """`raylab keys rotate`: wrap the record key with `settings`' active key-encryption key (the
    sealed ids stay as they are). Returns the new key id, or None when ids are not sealed."""
    if not _exists(database):
        return None
    with controldb.write_transaction(_engine(database), "raylab.lineage") as conn:
        row = conn.execute(sa.select(record_keys).where(record_keys.c.id == 1)).first()
        if row is None:
            return None
        new = crypto.rewrap_header({"provider": row.provider, "kek": row.kek, "dek": row.dek}, settings, _WHERE)
        conn.execute(sa.update(record_keys).where(record_keys.c.id == 1)
                     .values(provider=new["provider"], kek=new["kek"], dek=new["dek"]))
    return new["kek"]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- the suppression list


@dataclass(frozen=True)
class Suppression:
    """The erased records as the data stage's tasks check them (small, picklable)."""

    everywhere: frozenset[str] = frozenset()           # ids erased in every source
    scoped: frozenset[tuple[str, str]] = frozenset()   # (source, id)
    digest: str = field(default="")                     # part of the data stage's cache key

    def matches(self, source: str, record_id: str) -> bool:
        return record_id in self.everywhere or (source, record_id) in self.scoped

    def __len__(self) -> int:
        return len(self.everywhere) + len(self.scoped)


def suppression(database: str | None = None) -> Suppression:
    """The current suppression list (empty when no control-plane database exists yet)."""
    if not _exists(database):
        return Suppression(digest=_digest([]))
    with _engine(database).connect() as conn:
        key = _key_for_reading(conn)
        rows = [(r.source, _as_read(key, r.record_id))
                for r in conn.execute(sa.select(suppressions.c.source, suppressions.c.record_id))]
    return Suppression(everywhere=frozenset(r for s, r in rows if s == ANY_SOURCE),
                       scoped=frozenset((s, r) for s, r in rows if s != ANY_SOURCE), digest=_digest(rows))


def _digest(rows: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()[:16]


def suppress(record_id: str, source: str | None, reason: str, actor: str, versions: list[str],
             database: str | None = None) -> tuple[dict, bool]:
    """Add a record to the suppression list; returns (its entry, whether it is new). An id
    already suppressed keeps its first entry (when and why it was erased first)."""
    entry = {"source": source or ANY_SOURCE, "record_id": record_id, "reason": reason, "actor": actor,
             "time": _now(), "versions": json.dumps(sorted(versions))}
    with controldb.write_transaction(_engine(database), "raylab.lineage") as conn:
        key = _record_key(conn, create=True)
        stored = _as_stored(key, record_id)
        old = conn.execute(sa.select(suppressions).where(suppressions.c.source == entry["source"],
                                                         suppressions.c.record_id == stored)).first()
        if old is not None:
            return _suppression_dict(old, key), False
        new_id = conn.execute(sa.insert(suppressions).values(**{**entry, "record_id": stored})).inserted_primary_key[0]
    return {**entry, "id": new_id, "versions": sorted(versions)}, True


def _suppression_dict(row, key: RecordKey | None) -> dict:
    return {"id": row.id, "source": row.source, "record_id": _as_read(key, row.record_id), "time": row.time,
            "actor": row.actor, "reason": row.reason, "versions": json.loads(row.versions)}


def erased(database: str | None = None) -> list[dict]:
    """Every suppression entry, oldest first."""
    if not _exists(database):
        return []
    with _engine(database).connect() as conn:
        key = _key_for_reading(conn)
        return [_suppression_dict(r, key) for r in conn.execute(sa.select(suppressions).order_by(suppressions.c.id))]


# ---------------------------------------------------------------- the record index


def index_run(run: str, manifest_hash: str, created: str, records: Iterable[tuple[str, str]],
              database: str | None = None) -> bool:
    """Record the ids a data run accepted (once per run directory and manifest hash; a second
    call for the same pair, a cache hit, changes nothing). Returns whether it wrote."""
    eng = _engine(database)
    with controldb.write_transaction(eng, "raylab.lineage") as conn:
        if _data_run_id(conn, run, manifest_hash) is not None:
            return False
        key = _record_key(conn, create=True)
        ids = sorted({(source, _as_stored(key, record_id)) for source, record_id in records})
        run_id = conn.execute(sa.insert(data_runs).values(run=run, manifest_hash=manifest_hash, created=created,
                                                          records=len(ids))).inserted_primary_key[0]
        for start in range(0, len(ids), INSERT_CHUNK):  # executemany, in bounded statements
            conn.execute(sa.insert(record_index), [{"data_run": run_id, "source": s, "record_id": r}
                                                  for s, r in ids[start:start + INSERT_CHUNK]])
    return True


def is_indexed(run: str, manifest_hash: str, database: str | None = None) -> bool:
    if not _exists(database):
        return False
    with _engine(database).connect() as conn:
        return _data_run_id(conn, run, manifest_hash) is not None


def _data_run_id(conn, run: str, manifest_hash: str) -> int | None:
    return conn.execute(sa.select(data_runs.c.id).where(data_runs.c.run == run,
                                                        data_runs.c.manifest_hash == manifest_hash)).scalar()


@dataclass
class DataRun:
    """A data run that accepted the records asked about."""

    run: str
    manifest_hash: str
    created: str
    records: list[tuple[str, str]]  # (source, record_id) of the matches in this run
    matched: int                    # how many matched (records holds at most `limit` of them)


def runs_with(record_id: str | None = None, source: str | None = None, database: str | None = None,
              limit: int = 20) -> list[DataRun]:
    """The data runs that accepted `record_id` (in `source`, if given), or any record of
    `source`; oldest first. The database must exist (a reader never creates one)."""
    if record_id is None and source is None:
        raise ValueError("runs_with needs a record id or a source")
    ri, dr = record_index, data_runs
    found: dict[int, DataRun] = {}
    with _engine(database, create=False).connect() as conn:
        key = _key_for_reading(conn)
        where = [ri.c.record_id == _as_stored(key, record_id)] if record_id is not None else []
        where += [ri.c.source == source] if source is not None else []
        # sealed ids sort by ciphertext: a source's listing is in index order, not id order
        query = (sa.select(dr.c.id, dr.c.run, dr.c.manifest_hash, dr.c.created, ri.c.source, ri.c.record_id)
                 .join(ri, ri.c.data_run == dr.c.id).where(*where).order_by(dr.c.id, ri.c.source, ri.c.record_id))
        for row in conn.execute(query):
            hit = found.setdefault(row.id, DataRun(row.run, row.manifest_hash, row.created, [], 0))
            hit.matched += 1
            if len(hit.records) < limit:
                hit.records.append((row.source, _as_read(key, row.record_id)))
    return list(found.values())


def sources_of(record_id: str, database: str | None = None) -> list[str]:
    """The sources in which some data run accepted `record_id`."""
    with _engine(database, create=False).connect() as conn:
        stored = _as_stored(_key_for_reading(conn), record_id)
        return sorted(conn.execute(sa.select(record_index.c.source).distinct()
                                   .where(record_index.c.record_id == stored)).scalars())


def pending_for(manifest_hash: str, database: str | None = None) -> list[int]:
    """The suppression entries that name a record of the data with this manifest hash: a
    version trained on that data holds an erased record (its erasure is pending)."""
    if not manifest_hash or not _exists(database):
        return []
    s, ri, dr = suppressions, record_index, data_runs
    same_record = sa.and_(ri.c.record_id == s.c.record_id, sa.or_(s.c.source == ANY_SOURCE, s.c.source == ri.c.source))
    query = (sa.select(s.c.id).distinct().select_from(s.join(ri, same_record).join(dr, dr.c.id == ri.c.data_run))
             .where(dr.c.manifest_hash == manifest_hash).order_by(s.c.id))
    with _engine(database).connect() as conn:
        return list(conn.execute(query).scalars())
