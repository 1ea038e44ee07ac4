"""The fine-tuning service: uploaded files, jobs, and fine-tuned model names
(raylab/serve/ftstore.py).

Revision ID: 0005_fine_tuning
Revises: 0004_record_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_fine_tuning"
down_revision = "0004_record_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ft_files",
        sa.Column("id", sa.String(64), primary_key=True),               # file-<hex>
        sa.Column("org", sa.String(255), nullable=False, index=True),  # every query is scoped by it
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("location", sa.Text, nullable=False),                # where core.storage keeps it
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_table(
        "ft_jobs",
        # seq orders the listing (newest first) and pagination (`after`) without relying on
        # timestamps, which collide within a second.
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),   # ftjob-<hex>
        sa.Column("org", sa.String(255), nullable=False, index=True),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("finished_at", sa.Integer),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("suffix", sa.String(64)),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64)),
        sa.Column("request", sa.Text, nullable=False),       # the validated request (JSON): method, seed, metadata
        sa.Column("hyperparameters", sa.Text, nullable=False),  # JSON, "auto" resolved
        sa.Column("result_files", sa.Text, nullable=False),  # JSON list of file ids (the generated config first)
        sa.Column("error", sa.Text),                         # JSON {code, message, param} when failed
        sa.Column("ray_job_id", sa.String(255)),
        sa.Column("output_dir", sa.Text, nullable=False),
        sa.Column("fine_tuned_model", sa.String(512)),
        sa.Column("trained_tokens", sa.Integer),
    )
    op.create_table(
        "ft_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("job_id", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("data", sa.Text),
    )
    op.create_table(
        "ft_models",
        # ft:{base}:{org}:{suffix}:{job id} -> a registry version (registry names hold no colons)
        sa.Column("name", sa.String(512), primary_key=True),
        sa.Column("org", sa.String(255), nullable=False, index=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("registry_name", sa.String(255), nullable=False),
        sa.Column("registry_version", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in ("ft_models", "ft_events", "ft_jobs", "ft_files"):
        op.drop_table(table)
