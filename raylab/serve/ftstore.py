"""The fine-tuning service's records in the control-plane database: files, jobs, their events
and the fine-tuned model names (the schema is migrations/versions/0004_fine_tuning.py; the
tables below mirror it). Every read takes the caller's org, so one organisation's query never
returns another's rows: a missing row and another org's row look the same (404).

    row = insert_file(db, {...}); get_file(db, org, file_id); list_files(db, org, purpose)
    insert_job(db, {...}); get_job(db, org, job_id); list_jobs(db, org, after, limit)
    update_job(db, job_id, status=..., error=...); add_event(db, job_id, "info", "...")
"""

from __future__ import annotations

import json
import secrets
import time

import sqlalchemy as sa

from raylab.core import controldb

metadata = sa.MetaData()
files = sa.Table(
    "ft_files", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("org", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("location", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
)
jobs = sa.Table(
    "ft_jobs", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("org", sa.String(255), nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("finished_at", sa.Integer),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("suffix", sa.String(64)),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("training_file", sa.String(64), nullable=False),
    sa.Column("validation_file", sa.String(64)),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("hyperparameters", sa.Text, nullable=False),
    sa.Column("result_files", sa.Text, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("ray_job_id", sa.String(255)),
    sa.Column("output_dir", sa.Text, nullable=False),
    sa.Column("fine_tuned_model", sa.String(512)),
    sa.Column("trained_tokens", sa.Integer),
)
events = sa.Table(
    "ft_events", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("level", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("data", sa.Text),
)
models = sa.Table(
    "ft_models", metadata,
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("org", sa.String(255), nullable=False),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("registry_name", sa.String(255), nullable=False),
    sa.Column("registry_version", sa.Integer, nullable=False),
)
WRITER = "raylab.fine_tuning"  # the write lock's name (controldb.write_transaction)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def _one(db: str, query) -> dict | None:
    with controldb.engine(db).connect() as conn:
        row = conn.execute(query).first()
    return dict(row._mapping) if row is not None else None


def _all(db: str, query) -> list[dict]:
    with controldb.engine(db).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


# ---------------------------------------------------------------- files


def insert_file(db: str, row: dict) -> dict:
    with controldb.write_transaction(controldb.engine(db), WRITER) as conn:
        conn.execute(sa.insert(files).values(**row))
    return row


def get_file(db: str, org: str, file_id: str) -> dict | None:
    return _one(db, sa.select(files).where(files.c.id == file_id, files.c.org == org))


def list_files(db: str, org: str, purpose: str | None = None) -> list[dict]:
    query = sa.select(files).where(files.c.org == org).order_by(files.c.created_at.desc(), files.c.id)
    if purpose:
        query = query.where(files.c.purpose == purpose)
    return _all(db, query)


def delete_file(db: str, org: str, file_id: str) -> bool:
    with controldb.write_transaction(controldb.engine(db), WRITER) as conn:
        return conn.execute(sa.delete(files).where(files.c.id == file_id, files.c.org == org)).rowcount > 0


# ---------------------------------------------------------------- jobs


def insert_job(db: str, row: dict) -> dict:
    with controldb.write_transaction(controldb.engine(db), WRITER) as conn:
        conn.execute(sa.insert(jobs).values(**row))
    return row


def get_job(db: str, org: str, job_id: str) -> dict | None:
    return _one(db, sa.select(jobs).where(jobs.c.id == job_id, jobs.c.org == org))


def list_jobs(db: str, org: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
    """Newest first; `after` a job id: the jobs created before it. (rows, has_more)."""
    query = sa.select(jobs).where(jobs.c.org == org)
    if after:
        anchor = _one(db, sa.select(jobs.c.seq).where(jobs.c.id == after, jobs.c.org == org))
        if anchor is None:
            return [], False
        query = query.where(jobs.c.seq < anchor["seq"])
    rows = _all(db, query.order_by(jobs.c.seq.desc()).limit(limit + 1))
    return rows[:limit], len(rows) > limit


def update_job(db: str, job_id: str, *, unless: tuple[str, ...] = (), **values) -> bool:
    """Set `values` on a job, unless its status is one of `unless` (a finished job keeps its
    state: a cancel racing a success changes nothing). JSON-able values are stored as JSON."""
    for key in ("error", "result_files", "hyperparameters"):
        if key in values and not (values[key] is None or isinstance(values[key], str)):
            values[key] = json.dumps(values[key])
    query = sa.update(jobs).where(jobs.c.id == job_id)
    if unless:
        query = query.where(jobs.c.status.not_in(unless))
    with controldb.write_transaction(controldb.engine(db), WRITER) as conn:
        return conn.execute(query.values(**values)).rowcount > 0


def add_event(db: str, job_id: str, level: str, message: str, type_: str = "message", data: dict | None = None) -> None:
    row = {"id": new_id("ftevent"), "job_id": job_id, "created_at": now(), "level": level, "message": message,
           "type": type_, "data": json.dumps(data) if data is not None else None}
    with controldb.write_transaction(controldb.engine(db), WRITER) as conn:
        conn.execute(sa.insert(events).values(**row))


def add_metrics(db: str, job_id: str, rows: list[dict]) -> int:
    """Append `metrics` events for the rows (OpenAI's event `data`, each with a "step") newer
    than the job's last metrics event, in one write transaction, so two readers syncing the
    same run at once add each step once. Returns how many were added."""
    with controldb.write_transaction(controldb.engine(db), WRITER) as conn:
        last = conn.execute(sa.select(events.c.data).where(events.c.job_id == job_id, events.c.type == "metrics")
                            .order_by(events.c.seq.desc()).limit(1)).first()
        after = json.loads(last[0])["step"] if last else -1
        fresh = [r for r in rows if r["step"] > after]
        for r in fresh:
            message = f"Step {r['step']}: training loss={r['train_loss']:.4f}" if r.get("train_loss") is not None \
                else f"Step {r['step']}"
            if r.get("valid_loss") is not None:
                message += f", validation loss={r['valid_loss']:.4f}"
            conn.execute(sa.insert(events).values(id=new_id("ftevent"), job_id=job_id, created_at=now(), level="info",
                                                  message=message, type="metrics", data=json.dumps(r)))
        return len(fresh)


def list_events(db: str, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
    """Newest first, like OpenAI's; `after` an event id."""
    query = sa.select(events).where(events.c.job_id == job_id)
    if after:
        anchor = _one(db, sa.select(events.c.seq).where(events.c.id == after, events.c.job_id == job_id))
        if anchor is None:
            return [], False
        query = query.where(events.c.seq < anchor["seq"])
    rows = _all(db, query.order_by(events.c.seq.desc()).limit(limit + 1))
    return rows[:limit], len(rows) > limit


def add_model(db: str, row: dict) -> None:
    with controldb.write_transaction(controldb.engine(db), WRITER) as conn:
        if conn.execute(sa.select(models.c.name).where(models.c.name == row["name"])).first() is None:
            conn.execute(sa.insert(models).values(**row))


def get_model(db: str, name: str) -> dict | None:
    return _one(db, sa.select(models).where(models.c.name == name))
