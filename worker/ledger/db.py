"""Database engines for the ledger and the schema upgrade (alembic)."""

from __future__ import annotations

import functools
import random
import sqlite3
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

from worker.errors import ServiceUnavailable, hide_passwords

__all__ = [
    "make_engine", "reader", "begin_immediate", "upgrade", "current_revision", "safe_url", "sqlite_pragmas", "MIGRATIONS_DIR", "READ_ONLY",
]  # fmt: skip

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

#: How long a SQLite writer waits for another process's write lock, in ms.
SQLITE_BUSY_TIMEOUT_MS = 30_000

#: execution option of connections that only read (see :func:`reader`)
READ_ONLY = "imgsync_read_only"


def begin_immediate(dbapi_conn: sqlite3.Connection, timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    """``BEGIN IMMEDIATE`` on a raw SQLite connection, waiting for the write lock in steps of under a
    millisecond. SQLite's own busy handler sleeps 1, 2, 5, 10 … up to 100 ms between tries, so with a
    dozen writer processes a lock held for a millisecond cost its waiters tens of milliseconds.

    Raises:
        sqlite3.OperationalError: the lock stayed taken for ``timeout_ms``, or another error.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    dbapi_conn.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(random.uniform(0.0001, 0.001))
    finally:
        dbapi_conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def reader(engine: Engine) -> Engine:
    """``engine`` for transactions that only read. On SQLite they begin DEFERRED: in WAL mode a
    reader takes no lock and waits for no writer. Every other transaction begins IMMEDIATE (it holds
    the one write lock from its first statement, so it never fails half-way on a lock). Before this
    split every read took the write lock too, and a dozen worker processes queued behind each other
    (measured on a 16-core machine: preprocess tasks of 25 ms median spent 70 ms on average)."""
    return engine.execution_options(**{READ_ONLY: True})


def sqlite_pragmas(dbapi_conn) -> None:  # type: ignore[no-untyped-def]
    """What every SQLite file shared by several processes gets (ledger, embedded broker): WAL, a busy
    timeout, synchronous=NORMAL (in WAL mode a process crash loses no committed transaction)."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` writes so
    that several worker processes can share one file."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file in the way, a read-only mount, no permission
                from worker.errors import ConfigError

                raise ConfigError(
                    f"cannot create {folder} for the SQLite database {parsed.database} ({exc.strerror or exc}): "
                    "set IMGSYNC_HOME (or IMGSYNC_DATABASE_URL) to a folder this process may write"
                ) from exc
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            sqlite_pragmas(dbapi_conn)

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # type: ignore[no-untyped-def]
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                begin_immediate(conn.connection.dbapi_connection)

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _alembic_config(url: str, script_location: Path = MIGRATIONS_DIR):  # type: ignore[no-untyped-def]
    """An alembic config for the migrations under ``script_location`` (the state's by default)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> str:
    """Bring the state database at ``url`` to ``revision``; returns the revision reached.

    Raises:
        ServiceUnavailable: the database cannot be reached.
    """
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.begin()  # alembic runs inside it (an "external" transaction)
            if conn.dialect.name == "postgresql":  # several `db upgrade` at once: one after the other
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            _refuse_foreign_schema(conn, url)
            cfg = _alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
    except sa.exc.ProgrammingError as exc:  # a privilege the role lacks (CREATE on the schema, owning a table)
        refused = _privilege_error(exc, url)
        if refused is None:
            raise
        raise refused from exc
    except sa.exc.OperationalError as exc:
        if engine.dialect.name == "sqlite" and any(w in str(exc.orig).lower() for w in _SQLITE_NOT_WRITABLE):
            from worker.errors import ConfigError

            raise ConfigError(
                f"cannot open the SQLite database {engine.url.database} ({exc.orig}): set IMGSYNC_HOME "
                "(or IMGSYNC_DATABASE_URL) to a folder this process may write"
            ) from exc
        raise ServiceUnavailable("database", "IMGSYNC_DATABASE_URL", safe_url(url), str(exc.orig)) from exc
    finally:
        engine.dispose()
    return current_revision(url) or ""


#: PostgreSQL advisory lock held while the state schema is upgraded (the catalog's has its own key)
ADVISORY_LOCK_KEY = 0x1A65_57A7


def _refuse_foreign_schema(conn: sa.Connection, url: str) -> None:
    """Refuse a database whose alembic history this code does not know (a newer imgsync upgraded it,
    or another application keeps its own ``alembic_version`` there), or that holds tables of the
    state schema's names without its history (another application's ``images``).

    Raises:
        ConfigError: saying which, naming IMGSYNC_DATABASE_URL.
    """
    from alembic.runtime.migration import MigrationContext

    from worker.errors import ConfigError
    from worker.ledger.tables import metadata

    rev = MigrationContext.configure(conn).get_current_revision()
    if rev is not None:
        if rev not in known_revisions():
            raise ConfigError(unknown_revision_message(rev, url))
        return
    inspector = sa.inspect(conn)
    clash = sorted(set(inspector.get_table_names()) & set(metadata.tables))
    if clash:
        raise ConfigError(
            f"the state database at {safe_url(url)} (IMGSYNC_DATABASE_URL) already has {', '.join(clash)} but no imgsync "
            "schema: another application's tables; give imgsync a database (or a PostgreSQL schema, "
            "?options=-csearch_path%3Dimgsync) of its own"
        )


@functools.cache
def _scripts():  # type: ignore[no-untyped-def]
    """The state schema's migration scripts, read once per process (every command checks them)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("sqlite://"))


def known_revisions() -> set[str]:
    """Every revision of the state schema's history this code has."""
    return {s.revision for s in _scripts().walk_revisions()}


def unknown_revision_message(rev: str, url: str) -> str:
    return (
        f"the state database at {safe_url(url)} (IMGSYNC_DATABASE_URL) is at schema revision {rev!r}, which this "
        f"imgsync does not know (its newest is {head_revision()}): a newer imgsync upgraded it (run that version), "
        "or another application keeps its alembic history there (give imgsync a database of its own)"
    )


def _privilege_error(exc: sa.exc.ProgrammingError, url: str) -> Exception | None:
    """A privilege missing, as a setting to fix (exit 2, not an outage); None for another refusal."""
    from worker.errors import ConfigError

    if "permission denied" in str(exc.orig).lower() or "must be owner" in str(exc.orig).lower():
        return ConfigError(
            f"the state database at {safe_url(url)} (IMGSYNC_DATABASE_URL) refused the schema upgrade: {exc.orig}".strip()
            + " — grant that role CREATE on its schema (and ownership of imgsync's tables), or run `imgsync db upgrade` "
            "as their owner"
        )
    return None


#: what SQLite says of a database file it cannot open or write (a local setting, not an outage)
_SQLITE_NOT_WRITABLE = ("unable to open database file", "readonly database", "read-only")


def current_revision(url: str) -> str | None:
    """The schema revision of the database at ``url`` (None when never upgraded)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest schema revision this code needs."""
    return str(_scripts().get_current_head())


def safe_url(url: str) -> str:
    """``url`` (a database, Redis or AMQP URL) without its password, for messages. A URL SQLAlchemy
    cannot parse (the embedded broker's ``imgsync-sqlite://``, a kombu transport name) is shown with
    its password masked all the same, and so is each URL of a ``;``-separated failover list."""
    if ";" in url:
        return ";".join(safe_url(part) for part in url.split(";"))
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any URL SQLAlchemy cannot parse (ArgumentError, a bad port's ValueError)
        return hide_passwords(url)
