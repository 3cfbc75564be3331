"""images: the action (upsert or delete) of the newest accepted event, so that work sent again from
the ledger (redrive, failures replay, verify --repair) repeats a delete as a delete

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("action", sa.String(8)))  # NULL (rows from before): upsert


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("action")
