"""The audit log: one hash-chained entry per state change (raylab/core/audit/).

Revision ID: 0001_audit_log
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_audit_log"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        # unique: two appends that read the same head cannot both land (a fork of the chain).
        sa.Column("prev_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("time", sa.String(40), nullable=False, index=True),
        sa.Column("kind", sa.String(64), nullable=False, index=True),
        sa.Column("actor", sa.String(255), nullable=False, index=True),
        sa.Column("actor_kind", sa.String(32), nullable=False),
        sa.Column("run", sa.Text, nullable=True),
        sa.Column("model", sa.String(255), nullable=True, index=True),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("fields", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_log")
