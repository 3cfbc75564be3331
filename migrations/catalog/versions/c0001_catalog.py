"""catalog: products, product_images, catalog_outbox (+ the relay clock) and the change triggers

Every insert, update and delete of a product or an image writes one ``catalog_outbox`` row in the
same transaction; PostgreSQL also sends ``NOTIFY imgsync_catalog_outbox`` so relays wake at once.
Deleting a product deletes its images first (a BEFORE DELETE trigger), so each image leaves its own
outbox row that still knows the product's SKU (and SQLite cascades even without PRAGMA foreign_keys).

Revision ID: c0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "c0001"
down_revision = None
branch_labels = ("catalog",)
depends_on = None

#: channel of the PostgreSQL notification sent with every outbox row
CHANNEL = "imgsync_catalog_outbox"

# product changes the index cares about (a rename or a price change republishes nothing)
PRODUCT_CHANGED = "OLD.sku IS DISTINCT FROM NEW.sku OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at"
# image changes the index cares about; bumping updated_at says "the bytes at this uri changed"
IMAGE_CHANGED = " OR ".join(
    f"OLD.{c} IS DISTINCT FROM NEW.{c}"
    for c in ("uri", "product_id", "crop_x", "crop_y", "crop_w", "crop_h", "deleted_at", "updated_at")
)

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: an INTEGER key is the rowid


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("sku", sa.String(256), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        *_timestamps(),
    )
    op.create_index("ix_products_sku", "products", ["sku"])
    op.create_table(
        "product_images",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("product_id", _ID, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("crop_x", sa.Float(), nullable=True),
        sa.Column("crop_y", sa.Float(), nullable=True),
        sa.Column("crop_w", sa.Float(), nullable=True),
        sa.Column("crop_h", sa.Float(), nullable=True),
        *_timestamps(),
    )
    op.create_index("ix_product_images_product_id", "product_images", ["product_id"])
    op.create_index("ix_product_images_uri", "product_images", ["uri"])
    op.create_table(
        "catalog_outbox",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("entity", sa.String(16), nullable=False),  # product | image
        sa.Column("op", sa.String(8), nullable=False),  # insert | update | delete
        sa.Column("product_id", _ID, nullable=True),
        sa.Column("image_row_id", _ID, nullable=True),
        sa.Column("old_uri", sa.Text(), nullable=True),
        sa.Column("new_uri", sa.Text(), nullable=True),
        sa.Column("sku", sa.String(256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
    )
    pending = sa.text("processed_at IS NULL")
    op.create_index("ix_catalog_outbox_pending", "catalog_outbox", ["id"], postgresql_where=pending, sqlite_where=pending)
    op.create_index("ix_catalog_outbox_processed_at", "catalog_outbox", ["processed_at"])
    # the relay's clock: event versions in ns, strictly increasing across relays (see worker/sources/outbox.py)
    clock = op.create_table(
        "catalog_clock",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("ns", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(clock, [{"id": 1, "ns": 0}])
    if op.get_bind().dialect.name == "postgresql":
        _postgresql_triggers()
    else:
        _sqlite_triggers()


def _postgresql_triggers() -> None:
    op.execute(f"""
CREATE FUNCTION imgsync_catalog_product_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO catalog_outbox (entity, op, product_id, sku) VALUES ('product', 'delete', OLD.id, OLD.sku);
    ELSE
        INSERT INTO catalog_outbox (entity, op, product_id, sku) VALUES ('product', lower(TG_OP), NEW.id, NEW.sku);
    END IF;
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END $$""")
    op.execute("""
CREATE FUNCTION imgsync_catalog_product_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM product_images WHERE product_id = OLD.id;
    RETURN OLD;
END $$""")
    op.execute(f"""
CREATE FUNCTION imgsync_catalog_image_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    product_sku text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        SELECT sku INTO product_sku FROM products WHERE id = OLD.product_id;
        INSERT INTO catalog_outbox (entity, op, product_id, image_row_id, old_uri, sku)
            VALUES ('image', 'delete', OLD.product_id, OLD.id, OLD.uri, product_sku);
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT sku INTO product_sku FROM products WHERE id = NEW.product_id;
        INSERT INTO catalog_outbox (entity, op, product_id, image_row_id, old_uri, new_uri, sku)
            VALUES ('image', 'update', NEW.product_id, NEW.id, OLD.uri, NEW.uri, product_sku);
    ELSE
        SELECT sku INTO product_sku FROM products WHERE id = NEW.product_id;
        INSERT INTO catalog_outbox (entity, op, product_id, image_row_id, new_uri, sku)
            VALUES ('image', 'insert', NEW.product_id, NEW.id, NEW.uri, product_sku);
    END IF;
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END $$""")
    for stmt in (
        (
            "CREATE TRIGGER imgsync_outbox_products_ins_del AFTER INSERT OR DELETE ON products "
            "FOR EACH ROW EXECUTE FUNCTION imgsync_catalog_product_outbox()"
        ),
        (
            f"CREATE TRIGGER imgsync_outbox_products_upd AFTER UPDATE ON products "
            f"FOR EACH ROW WHEN ({PRODUCT_CHANGED}) EXECUTE FUNCTION imgsync_catalog_product_outbox()"
        ),
        (
            "CREATE TRIGGER imgsync_products_delete_images BEFORE DELETE ON products "
            "FOR EACH ROW EXECUTE FUNCTION imgsync_catalog_product_cascade()"
        ),
        (
            "CREATE TRIGGER imgsync_outbox_images_ins_del AFTER INSERT OR DELETE ON product_images "
            "FOR EACH ROW EXECUTE FUNCTION imgsync_catalog_image_outbox()"
        ),
        (
            f"CREATE TRIGGER imgsync_outbox_images_upd AFTER UPDATE ON product_images "
            f"FOR EACH ROW WHEN ({IMAGE_CHANGED}) EXECUTE FUNCTION imgsync_catalog_image_outbox()"
        ),
    ):
        op.execute(stmt)


def _sqlite_triggers() -> None:
    now = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    sku_of = "(SELECT sku FROM products WHERE id = {}.product_id)"

    def changed(condition: str) -> str:  # SQLite spells IS DISTINCT FROM as IS NOT
        return condition.replace("IS DISTINCT FROM", "IS NOT")

    for stmt in (
        f"""CREATE TRIGGER imgsync_outbox_products_ins AFTER INSERT ON products BEGIN
            INSERT INTO catalog_outbox (entity, op, product_id, sku, created_at)
            VALUES ('product', 'insert', NEW.id, NEW.sku, {now}); END""",
        f"""CREATE TRIGGER imgsync_outbox_products_upd AFTER UPDATE ON products WHEN {changed(PRODUCT_CHANGED)} BEGIN
            INSERT INTO catalog_outbox (entity, op, product_id, sku, created_at)
            VALUES ('product', 'update', NEW.id, NEW.sku, {now}); END""",
        """CREATE TRIGGER imgsync_products_delete_images BEFORE DELETE ON products BEGIN
            DELETE FROM product_images WHERE product_id = OLD.id; END""",
        f"""CREATE TRIGGER imgsync_outbox_products_del AFTER DELETE ON products BEGIN
            INSERT INTO catalog_outbox (entity, op, product_id, sku, created_at)
            VALUES ('product', 'delete', OLD.id, OLD.sku, {now}); END""",
        f"""CREATE TRIGGER imgsync_outbox_images_ins AFTER INSERT ON product_images BEGIN
            INSERT INTO catalog_outbox (entity, op, product_id, image_row_id, new_uri, sku, created_at)
            VALUES ('image', 'insert', NEW.product_id, NEW.id, NEW.uri, {sku_of.format("NEW")}, {now}); END""",
        f"""CREATE TRIGGER imgsync_outbox_images_upd AFTER UPDATE ON product_images WHEN {changed(IMAGE_CHANGED)} BEGIN
            INSERT INTO catalog_outbox (entity, op, product_id, image_row_id, old_uri, new_uri, sku, created_at)
            VALUES ('image', 'update', NEW.product_id, NEW.id, OLD.uri, NEW.uri, {sku_of.format("NEW")}, {now}); END""",
        f"""CREATE TRIGGER imgsync_outbox_images_del AFTER DELETE ON product_images BEGIN
            INSERT INTO catalog_outbox (entity, op, product_id, image_row_id, old_uri, sku, created_at)
            VALUES ('image', 'delete', OLD.product_id, OLD.id, OLD.uri, {sku_of.format("OLD")}, {now}); END""",
    ):
        op.execute(stmt)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, trigger in (
            ("products", "imgsync_outbox_products_ins_del"),
            ("products", "imgsync_outbox_products_upd"),
            ("products", "imgsync_products_delete_images"),
            ("product_images", "imgsync_outbox_images_ins_del"),
            ("product_images", "imgsync_outbox_images_upd"),
        ):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
        for fn in ("imgsync_catalog_product_outbox", "imgsync_catalog_product_cascade", "imgsync_catalog_image_outbox"):
            op.execute(f"DROP FUNCTION IF EXISTS {fn}()")
    # SQLite drops a table's triggers with the table
    op.drop_table("catalog_clock")
    op.drop_index("ix_catalog_outbox_processed_at", table_name="catalog_outbox")
    op.drop_index("ix_catalog_outbox_pending", table_name="catalog_outbox")
    op.drop_table("catalog_outbox")
    op.drop_index("ix_product_images_uri", table_name="product_images")
    op.drop_index("ix_product_images_product_id", table_name="product_images")
    op.drop_table("product_images")
    op.drop_index("ix_products_sku", table_name="products")
    op.drop_table("products")
