"""API keys: identities for the API and the inference endpoint (raylab/core/access/keys.py).

Revision ID: 0003_api_keys
Revises: 0002_lineage
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_api_keys"
down_revision = "0002_lineage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        # The key's public part (it is in the key itself: rlk_<key_id>_<secret>), so a
        # presented key is found by one indexed lookup, then its digest compared.
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),  # sha256 hex of the whole key
        sa.Column("name", sa.String(255), nullable=False),   # the identity (subject) it stands for
        sa.Column("org", sa.String(255), nullable=False, index=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("created", sa.String(40), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("revoked", sa.String(40)),                 # when; NULL while the key is valid
        sa.Column("revoked_by", sa.String(255)),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
