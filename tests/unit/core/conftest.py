"""Unit tests here exercise the in-process event path (`events._append`). When the integration
tier ran first in the same pytest process, its session Ray is still connected, and `events.emit`
would hand each event to the cluster's writer actor instead: a process with its own cached keys
and environment (no moto, no AWS region), so a test of this process's key handling would check
the actor's. Ray is not the subject here; the path without it is."""

from __future__ import annotations

import pytest

from raylab.core import events


@pytest.fixture(autouse=True)
def events_in_process(monkeypatch):
    monkeypatch.setattr(events, "_writer", lambda: None)


@pytest.fixture(scope="module")
def pg_server():
    from pg_helpers import postgres_server

    with postgres_server() as pg:
        yield pg


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def control_db(request, tmp_path, monkeypatch):
    """A fresh, empty control-plane database URL, set as $RAYLAB_DATABASE_URL: SQLite, and a
    new database on a throwaway PostgreSQL per test (marked integration)."""
    import os

    import sqlalchemy as sa

    from raylab.core import controldb

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'control.db'}"
    else:
        pg = request.getfixturevalue("pg_server")
        name = f"{request.module.__name__.rsplit('.', 1)[-1]}_{os.getpid()}_{abs(hash(request.node.name)) % 10**8}"
        admin = sa.create_engine(controldb.normalise(pg.url), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"drop database if exists {name}"))
            conn.execute(sa.text(f"create database {name}"))
        admin.dispose()
        url = pg.url.rsplit("/", 1)[0] + "/" + name  # postgresql://: raylab normalises it to psycopg2
    monkeypatch.setenv("RAYLAB_DATABASE_URL", url)
    yield url
    controldb.dispose_all()
