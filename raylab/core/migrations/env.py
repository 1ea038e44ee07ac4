"""Alembic's entry point for raylab's control-plane database.

raylab runs migrations itself (`controldb.engine`), passing an open connection inside a write
transaction in `config.attributes["connection"]`; offline (SQL script) mode is not supported.
The version table is raylab's own (controldb.VERSION_TABLE): MLflow may share the database and
keeps its own `alembic_version`.
"""

from __future__ import annotations

from alembic import context

from raylab.core.controldb import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("raylab's migrations run through raylab.core.controldb.engine(url), which passes a connection")
context.configure(connection=connection, version_table=VERSION_TABLE, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
