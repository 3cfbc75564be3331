"""ledger: one row per image and per SKU

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("image_id", sa.String(32), primary_key=True),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sku", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("content_hash", sa.String(64), nullable=True),
        sa.Column("model_id", sa.String(200), nullable=True),
        sa.Column("version", sa.String(40), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_images_sku_state", "images", ["sku", "state"])
    op.create_index("ix_images_state", "images", ["state"])
    op.create_index("ix_images_request_id", "images", ["request_id"])
    op.create_table(
        "skus",
        sa.Column("sku", sa.String(256), primary_key=True),
        sa.Column("dirty_gen", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("clean_gen", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("image_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("model_id", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "index_versions",
        sa.Column("model_id", sa.String(200), primary_key=True),
        sa.Column("images_collection", sa.String(255), nullable=False, unique=True),
        sa.Column("skus_collection", sa.String(255), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("index_versions")
    op.drop_table("skus")
    op.drop_index("ix_images_request_id", table_name="images")
    op.drop_index("ix_images_state", table_name="images")
    op.drop_index("ix_images_sku_state", table_name="images")
    op.drop_table("images")
