"""Alembic migrations of the control-plane database (run by raylab.core.controldb.engine)."""
