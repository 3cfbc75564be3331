"""Alembic environment of the catalog schema: runs on the connection handed over by
``worker.sources.catalog_db.upgrade_catalog``, with its own version table."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

#: version table of this branch (the worker state keeps the default ``alembic_version``)
VERSION_TABLE = "alembic_version_catalog"
#: PostgreSQL advisory lock held while upgrading, so that relays starting together upgrade once
ADVISORY_LOCK_KEY = 0x1A65C0DE

config = context.config


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, version_table=VERSION_TABLE)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
