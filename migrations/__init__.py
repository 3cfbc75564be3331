"""Alembic migrations of the worker state (ledger) and the reference catalog schema."""
