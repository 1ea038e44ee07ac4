"""Record-id encryption: the wrapped key that seals record ids in the lineage tables when
governance.encryption is on (raylab/core/lineage.py, `RecordKey`).

Revision ID: 0004_record_keys
Revises: 0003_api_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_record_keys"
down_revision = "0003_api_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "record_keys",
        # One row (id 1) per database: ids must compare equal across data runs and erasures,
        # so every run seals them with the same key. Its data key is wrapped by the
        # key-encryption key of the provider that created it, like a sealed file's header.
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("created", sa.String(40), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),  # local | aws-kms
        sa.Column("kek", sa.Text, nullable=False),             # the key-encryption key's id
        sa.Column("dek", sa.Text, nullable=False),             # base64 of the wrapped data key
    )


def downgrade() -> None:
    op.drop_table("record_keys")
