"""images: an index for work still waiting (pending, or indexed with a newer event not yet processed),
read by the redrive (worker.redrive), `imgsync status` and the scrape-time gauges

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_images_state_outcome_updated", "images", ["state", "outcome", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_images_state_outcome_updated", table_name="images")
