"""model versions: per-(image, model) vector provenance, version status (serving/standby/building/retired);
the crop box of each image

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("crop", sa.Text()))  # the catalog's crop box (JSON), for re-indexing
    with op.batch_alter_table("index_versions") as batch:
        batch.add_column(sa.Column("spec", sa.String(500)))
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="building"))
        batch.add_column(sa.Column("activated_at", sa.DateTime(timezone=True)))
    op.create_table(
        "image_vectors",
        sa.Column("image_id", sa.String(32), primary_key=True),
        sa.Column("model_id", sa.String(200), primary_key=True),
        sa.Column("version", sa.String(40), nullable=False),
        sa.Column("sku", sa.String(256), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_image_vectors_model_sku", "image_vectors", ["model_id", "sku"])
    # what was indexed before versions had a status: the newest version serves, its vectors are known
    conn = op.get_bind()
    newest = conn.execute(
        sa.text("SELECT model_id FROM index_versions ORDER BY created_at DESC LIMIT 1")
    ).scalar()
    if newest is not None:
        conn.execute(sa.text("UPDATE index_versions SET status = 'retired'"))  # not kept in sync before
        conn.execute(
            sa.text("UPDATE index_versions SET status = 'serving', activated_at = created_at WHERE model_id = :m"),
            {"m": newest},
        )
    conn.execute(
        sa.text(
            "INSERT INTO image_vectors (image_id, model_id, version, sku, content_hash, indexed_at) "
            "SELECT image_id, model_id, version, sku, content_hash, COALESCE(indexed_at, updated_at) FROM images "
            "WHERE state = 'indexed' AND model_id IS NOT NULL AND content_hash IS NOT NULL"
        )
    )


def downgrade() -> None:
    op.drop_index("ix_image_vectors_model_sku", "image_vectors")
    op.drop_table("image_vectors")
    with op.batch_alter_table("index_versions") as batch:
        batch.drop_column("activated_at")
        batch.drop_column("status")
        batch.drop_column("spec")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("crop")
