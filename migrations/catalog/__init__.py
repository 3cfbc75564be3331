"""Alembic branch of the reference catalog schema (products, images, outbox and its triggers).

Kept apart from the worker state so that a catalog in its own database gets only catalog tables;
its revisions live in ``versions/`` and its version table is ``alembic_version_catalog``."""
