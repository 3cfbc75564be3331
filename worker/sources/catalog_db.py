"""The reference catalog schema: its tables (SQLAlchemy Core) and its upgrade.

The schema itself (tables, outbox triggers for PostgreSQL and SQLite) is created by the alembic
branch in ``migrations/catalog/``, with its own version table, so that a catalog in a database of
its own gets only catalog tables and one that shares the state database keeps both histories apart.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from worker.errors import ServiceUnavailable
from worker.ledger.db import safe_url

__all__ = [
    "CATALOG_MIGRATIONS_DIR",
    "HEAD",
    "NOTIFY_CHANNEL",
    "VERSION_TABLE",
    "catalog_clock",
    "catalog_engine",
    "catalog_revision",
    "outbox",
    "product_images",
    "products",
    "same_database",
    "upgrade_catalog",
]

CATALOG_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations" / "catalog"
#: alembic version table of the catalog branch
VERSION_TABLE = "alembic_version_catalog"
#: PostgreSQL channel the outbox triggers notify
NOTIFY_CHANNEL = "imgsync_catalog_outbox"
#: the setting named when the catalog cannot be reached
SETTING = "IMGSYNC_CATALOG_URL"
#: PostgreSQL advisory lock held while upgrading (the same key as migrations/catalog/env.py)
ADVISORY_LOCK_KEY = 0x1A65C0DE
#: newest revision of the catalog branch (what a hand-hooked catalog is stamped with)
HEAD = "c0001"

metadata = sa.MetaData()

products = sa.Table(
    "products",
    metadata,
    sa.Column("id", sa.BigInteger(), primary_key=True),
    sa.Column("sku", sa.String(256), nullable=False),
    sa.Column("name", sa.Text()),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
)

product_images = sa.Table(
    "product_images",
    metadata,
    sa.Column("id", sa.BigInteger(), primary_key=True),
    sa.Column("product_id", sa.BigInteger(), sa.ForeignKey("products.id"), nullable=False),
    sa.Column("uri", sa.Text(), nullable=False),
    sa.Column("position", sa.Integer(), nullable=False),
    sa.Column("crop_x", sa.Float()),
    sa.Column("crop_y", sa.Float()),
    sa.Column("crop_w", sa.Float()),
    sa.Column("crop_h", sa.Float()),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
)

outbox = sa.Table(
    "catalog_outbox",
    metadata,
    sa.Column("id", sa.BigInteger(), primary_key=True),
    sa.Column("entity", sa.String(16), nullable=False),
    sa.Column("op", sa.String(8), nullable=False),
    sa.Column("product_id", sa.BigInteger()),
    sa.Column("image_row_id", sa.BigInteger()),
    sa.Column("old_uri", sa.Text()),
    sa.Column("new_uri", sa.Text()),
    sa.Column("sku", sa.String(256)),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("processed_at", sa.DateTime(timezone=True)),
)

catalog_clock = sa.Table(
    "catalog_clock",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("ns", sa.BigInteger(), nullable=False),
)


def catalog_engine(url: str) -> Engine:
    """An engine for the catalog (SQLite: WAL, busy timeout, ``BEGIN IMMEDIATE`` like the ledger)."""
    from worker.ledger.db import make_engine

    return make_engine(url)


def _alembic_config(url: str):  # type: ignore[no-untyped-def]
    from worker.ledger.db import _alembic_config as alembic_config

    return alembic_config(url, CATALOG_MIGRATIONS_DIR)


def upgrade_catalog(url: str, revision: str = "heads") -> str:
    """Create or upgrade the reference catalog schema at ``url``; returns the revision reached.

    Idempotent, and safe when several relays start at once: the whole upgrade is one transaction
    that holds an advisory lock (PostgreSQL) or the write lock (SQLite, ``BEGIN IMMEDIATE``).

    Raises:
        ServiceUnavailable: the catalog database cannot be reached (names IMGSYNC_CATALOG_URL).
        ConfigError: the database has tables of the reference schema's names but no catalog
            revision: a catalog of its own, to hook by hand (see README) and stamp.
    """
    from alembic import command

    engine = catalog_engine(url)
    try:
        with engine.connect() as conn:
            conn.begin()  # alembic runs inside it (an "external" transaction)
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            _refuse_foreign_tables(conn, url)
            cfg = _alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
    except sa.exc.OperationalError as exc:
        raise ServiceUnavailable("catalog database", SETTING, safe_url(url), str(exc.orig)) from exc
    finally:
        engine.dispose()
    return catalog_revision(url) or ""


def _refuse_foreign_tables(conn: sa.Connection, url: str) -> None:
    from alembic.runtime.migration import MigrationContext

    from worker.errors import ConfigError

    rev = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    if rev is not None:
        from alembic.script import ScriptDirectory

        known = {s.revision for s in ScriptDirectory.from_config(_alembic_config(url)).walk_revisions()}
        if rev not in known:
            raise ConfigError(
                f"the catalog at {safe_url(url)} ({SETTING}) is at catalog schema revision {rev!r}, which this imgsync "
                f"does not know (its newest is {HEAD}): a newer imgsync upgraded it; run that version"
            )
        return
    inspector = sa.inspect(conn)
    clash = sorted((set(inspector.get_table_names()) | set(inspector.get_view_names())) & set(metadata.tables))
    if clash:
        raise ConfigError(
            f"the catalog at {safe_url(url)} ({SETTING}) already has {', '.join(clash)} but no imgsync catalog "
            f"schema ({VERSION_TABLE}): hook your own tables to the outbox by hand and stamp revision "
            f"{HEAD!r} (README, 'Catalog outbox'), point {SETTING} at an empty database, or upgrade with `imgsync db upgrade --skip-catalog`"
        )


def catalog_revision(url: str) -> str | None:
    """The catalog schema revision at ``url`` (None when never upgraded).

    Raises:
        ServiceUnavailable: the catalog database cannot be reached.
    """
    from alembic.runtime.migration import MigrationContext

    engine = catalog_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    except sa.exc.OperationalError as exc:
        raise ServiceUnavailable("catalog database", SETTING, safe_url(url), str(exc.orig)) from exc
    finally:
        engine.dispose()


def same_database(a: str, b: str) -> bool:
    """True when two SQLAlchemy URLs name the same database (SQLite: the same file)."""
    ua, ub = make_url(a), make_url(b)
    if ua.get_backend_name() != ub.get_backend_name():
        return False
    if ua.get_backend_name() == "sqlite":
        return bool(ua.database and ub.database) and Path(ua.database).resolve() == Path(ub.database).resolve()
    return (ua.host, ua.port, ua.database) == (ub.host, ub.port, ub.database)


