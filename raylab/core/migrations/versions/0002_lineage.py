"""Lineage and erasure: which data runs accepted which records, and the suppression list
every later data run honours (raylab/core/lineage.py).

Revision ID: 0002_lineage
Revises: 0001_audit_log
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_lineage"
down_revision = "0001_audit_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run", sa.Text, nullable=False),
        # The data a version was trained on is named by this hash (the version's
        # `data_manifest_hash` tag): the join from a record to model versions.
        sa.Column("manifest_hash", sa.String(64), nullable=False, index=True),
        sa.Column("created", sa.String(40), nullable=False),
        sa.Column("records", sa.Integer, nullable=False),
        sa.UniqueConstraint("run", "manifest_hash", name="uq_data_runs_run_manifest"),
    )
    op.create_table(
        "record_index",
        sa.Column("data_run", sa.Integer, sa.ForeignKey("data_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("record_id", sa.String(1024), nullable=False),
        sa.PrimaryKeyConstraint("data_run", "source", "record_id", name="pk_record_index"),
    )
    # Lineage looks records up by id (and by source): the primary key leads with the run.
    op.create_index("ix_record_index_record_id", "record_index", ["record_id"])
    op.create_index("ix_record_index_source", "record_index", ["source"])
    op.create_table(
        "suppressions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(255), nullable=False),  # '' = the id in every source
        sa.Column("record_id", sa.String(1024), nullable=False),
        sa.Column("time", sa.String(40), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("versions", sa.Text, nullable=False),  # JSON: the versions marked erasure_pending
        sa.UniqueConstraint("source", "record_id", name="uq_suppressions_source_record"),
    )


def downgrade() -> None:
    op.drop_table("suppressions")
    op.drop_index("ix_record_index_source", "record_index")
    op.drop_index("ix_record_index_record_id", "record_index")
    op.drop_table("record_index")
    op.drop_table("data_runs")
