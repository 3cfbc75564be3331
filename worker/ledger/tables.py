"""SQLAlchemy Core tables of the ledger (the schema itself is created by ``migrations/``)."""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "metadata",
    "images",
    "image_vectors",
    "skus",
    "index_versions",
    "workers",
    "dead_letters",
    "ImageState",
    "VersionStatus",
]

metadata = sa.MetaData()


class ImageState:
    pending = "pending"
    indexed = "indexed"
    failed = "failed"
    deleted = "deleted"
    ALL = (pending, indexed, failed, deleted)


class VersionStatus:
    """Life of a model version (its pair of collections).

    ``serving``: the aliases point at it. ``standby``: served before the last cutover; kept in sync so
    that ``rollback`` is instant. ``building``: filled in the background (``reindex --model``).
    ``retired``: no longer written to.
    """

    serving = "serving"
    standby = "standby"
    building = "building"
    retired = "retired"
    ACTIVE = (serving, standby, building)


images = sa.Table(
    "images",
    metadata,
    sa.Column("image_id", sa.String(32), primary_key=True),
    sa.Column("uri", sa.Text(), nullable=False),
    sa.Column("sku", sa.String(256), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32)),
    sa.Column("detail", sa.Text()),
    sa.Column("content_hash", sa.String(64)),
    sa.Column("model_id", sa.String(200)),
    sa.Column("version", sa.String(40), nullable=False),
    sa.Column("event_time", sa.DateTime(timezone=True)),
    sa.Column("request_id", sa.String(64)),
    sa.Column("outcome", sa.String(16)),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("indexed_at", sa.DateTime(timezone=True)),
    sa.Column("crop", sa.Text()),
    sa.Column("action", sa.String(8)),  # of the newest accepted event; NULL (older rows): upsert
)

skus = sa.Table(
    "skus",
    metadata,
    sa.Column("sku", sa.String(256), primary_key=True),
    sa.Column("dirty_gen", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("clean_gen", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("image_count", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("model_id", sa.String(200)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

index_versions = sa.Table(
    "index_versions",
    metadata,
    sa.Column("model_id", sa.String(200), primary_key=True),
    sa.Column("images_collection", sa.String(255), nullable=False, unique=True),
    sa.Column("skus_collection", sa.String(255), nullable=False),
    sa.Column("dim", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("spec", sa.String(500)),
    sa.Column("status", sa.String(16), nullable=False, server_default=VersionStatus.building),
    sa.Column("activated_at", sa.DateTime(timezone=True)),
)

#: which vector each model version holds for an image (written when Milvus accepted it)
image_vectors = sa.Table(
    "image_vectors",
    metadata,
    sa.Column("image_id", sa.String(32), primary_key=True),
    sa.Column("model_id", sa.String(200), primary_key=True),
    sa.Column("version", sa.String(40), nullable=False),
    sa.Column("sku", sa.String(256), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=False),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("queues", sa.String(500), nullable=False),
    sa.Column("model", sa.String(500), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("task", sa.String(100), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("error", sa.Text(), nullable=False),
    sa.Column("body", sa.Text(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
