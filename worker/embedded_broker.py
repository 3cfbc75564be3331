"""The embedded broker: a kombu transport on one SQLite file, for the embedded mode.

kombu's own SQLAlchemy transport was the embedded mode's ceiling (measured, BENCHMARKS.md): every
fetch, on an empty queue too, opened ``BEGIN IMMEDIATE`` and held SQLite's one write lock through an
ORM query, a flush and a commit, so with a dozen worker processes everything queued behind that lock
(about 120 tasks/s on a 16-core GPU machine, 1 % GPU utilisation). It also never deleted a delivered
message, only marked it invisible, and every later fetch walked past all of them.

This transport keeps kombu's tables (``kombu_queue``, ``kombu_message``: a file written by either one
reads in the other; imgsync adds a nullable ``owner`` column) and changes how they are used:

- a fetch reads the queue's oldest message outside any write lock, then takes it with one
  ``UPDATE … RETURNING`` that hides the row and records its owner (host, pid and the process's start
  time); if another consumer took it first, it reads again;
- the row stays in the file, hidden, until the consumer acknowledges the message (then it is
  deleted) or rejects it (deleted, or shown again in its place with ``requeue``). A consumer that
  closes shows again what it did not acknowledge, as kombu's virtual transports do;
- a consumer killed outright (SIGKILL, the OOM killer) loses nothing: every consumer, when it
  connects and then every few seconds while its queues are empty, shows again the rows whose owner
  process is gone. The message is delivered again at once, with no visibility timeout to wait for.
  That is at-least-once delivery, like AMQP's; every imgsync task is idempotent;
- writers wait for the lock in sub-millisecond steps (``worker.ledger.db.begin_immediate``), not in
  SQLite's own sleeps that grow to 100 ms;
- an empty queue costs one indexed read and takes no lock.

A consumer with ``no_ack`` (replies, broadcasts) takes its messages with ``DELETE … RETURNING``.
Hidden rows with no owner are what kombu's SQLAlchemy transport left behind (it hid delivered
messages forever): they are deleted on connect.

URL: ``imgsync-sqlite:///absolute/path/broker.db``. Importing this module registers the scheme.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, virtual

from worker.ledger.db import SQLITE_BUSY_TIMEOUT_MS, begin_immediate, sqlite_pragmas
from worker.procs import pid_alive, start_time

__all__ = ["SCHEME", "Transport", "broker_url"]

log = logging.getLogger(__name__)

SCHEME = "imgsync-sqlite"
TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"

#: seconds between polls of empty queues: a poll is one indexed read and takes no lock
POLLING_INTERVAL = 0.02
#: seconds between two looks for messages held by processes that are gone (one small read)
RECLAIM_SECONDS = 2.0
#: message property carrying the row a delivered message came from (never stored)
ROW_PROPERTY = "imgsync_row"

_SCHEMA = (
    # kombu's SQLAlchemy models, as SQLAlchemy creates them on SQLite
    "CREATE TABLE IF NOT EXISTS kombu_queue (id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, name VARCHAR(200), "
    "UNIQUE (name))",
    "CREATE TABLE IF NOT EXISTS kombu_message (id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, visible BOOLEAN, "
    "timestamp DATETIME, payload TEXT NOT NULL, version SMALLINT NOT NULL, queue_id INTEGER, "
    "CONSTRAINT FK_kombu_message_queue FOREIGN KEY(queue_id) REFERENCES kombu_queue (id))",
    "CREATE INDEX IF NOT EXISTS ix_kombu_message_visible ON kombu_message (visible)",
    "CREATE INDEX IF NOT EXISTS ix_kombu_message_timestamp ON kombu_message (timestamp)",
    "CREATE INDEX IF NOT EXISTS ix_kombu_message_timestamp_id ON kombu_message (timestamp, id)",
    # ours: a queue's next message in one index lookup
    "CREATE INDEX IF NOT EXISTS ix_imgsync_message_next ON kombu_message (queue_id, visible, id)",
)


def broker_url(path: Path) -> str:
    """The URL of the embedded broker file ``path``."""
    return f"{SCHEME}://{Path(path).resolve()}"


def _path_of(url: str) -> Path:
    if not url.startswith(f"{SCHEME}://"):
        raise ValueError(f"not an embedded broker URL: {url!r} (expected {SCHEME}:///absolute/path)")
    return Path(url[len(SCHEME) + 3 :])


# --- who holds a message -------------------------------------------------------------------------

_HOST = socket.gethostname()
_owner_cache: tuple[int, str] | None = None


def owner() -> str:
    """This process as a message owner: ``host|pid|start time`` (the start time is empty without /proc)."""
    global _owner_cache
    pid = os.getpid()
    if _owner_cache is None or _owner_cache[0] != pid:  # forked: the child is another owner
        _owner_cache = (pid, f"{_HOST}|{pid}|{start_time(pid) or ''}")
    return _owner_cache[1]


def owner_alive(name: str) -> bool:
    """False when the process ``name`` (see :func:`owner`) has ended. A process on another host cannot
    be checked from here and counts as alive."""
    try:
        host, pid_text, start = name.rsplit("|", 2)
        pid = int(pid_text)
    except ValueError:
        return False  # not written by this transport: nobody will ever acknowledge it
    if host != _HOST:
        return True
    return start_time(pid) == start if start else pid_alive(pid)


def reclaim(conn: sqlite3.Connection) -> int:
    """Show again the messages held by processes that have ended; returns how many."""
    held = [o for (o,) in conn.execute("SELECT DISTINCT owner FROM kombu_message WHERE visible = 0 AND owner IS NOT NULL")]
    gone = [o for o in held if not owner_alive(o)]
    if not gone:
        return 0
    with _write(conn):
        n = sum(
            conn.execute("UPDATE kombu_message SET visible = 1, owner = NULL WHERE visible = 0 AND owner = ?", (o,)).rowcount
            for o in gone
        )
    if n:
        log.warning("embedded broker: %d message(s) held by %d ended process(es) are delivered again", n, len(gone))
    return n


# --- connections -----------------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    """A connection to the broker file, its tables made if missing (once per connection: cheap, and
    right even when the file was deleted and made again under a running process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    sqlite_pragmas(conn)
    with _write(conn):
        for stmt in _SCHEMA:
            conn.execute(stmt)
        if "owner" not in {r[1] for r in conn.execute("PRAGMA table_info(kombu_message)")}:
            conn.execute("ALTER TABLE kombu_message ADD COLUMN owner VARCHAR(200)")
        # messages kombu's SQLAlchemy transport delivered and left behind (hidden, no owner)
        conn.execute("DELETE FROM kombu_message WHERE visible = 0 AND owner IS NULL")
    reclaim(conn)
    return conn


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: the lock taken in sub-millisecond steps, committed or rolled back."""
    begin_immediate(conn)
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Channel(virtual.Channel):
    """One kombu channel; one SQLite connection per thread and process."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        self._path = _path_of(connection.client.hostname)
        self._local = threading.local()
        self._queue_ids: dict[str, int] = {}
        self._pid = os.getpid()
        self._no_ack_queues: set[str] = set()
        self._next_reclaim = time.monotonic() + RECLAIM_SECONDS  # the connection reclaims first
        super().__init__(connection, **kwargs)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # forked: the parent's connections and ids are not ours
            self._local, self._queue_ids, self._pid = threading.local(), {}, os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self._path)
        return conn

    def _queue_id(self, queue: str) -> int:
        qid = self._queue_ids.get(queue)
        if qid is None:
            db = self._db
            with _write(db):
                db.execute("INSERT OR IGNORE INTO kombu_queue (name) VALUES (?)", (queue,))
            qid = self._queue_ids[queue] = db.execute("SELECT id FROM kombu_queue WHERE name = ?", (queue,)).fetchone()[0]
        return qid

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self._queue_id(queue)

    def _put(self, queue: str, message: dict, **kwargs: Any) -> None:
        message.get("properties", {}).pop(ROW_PROPERTY, None)  # a copy is a new row
        db, qid = self._db, self._queue_id(queue)
        with _write(db):
            db.execute(
                "INSERT INTO kombu_message (visible, timestamp, payload, version, queue_id) VALUES (1, ?, ?, 1, ?)",
                (datetime.now().isoformat(sep=" "), json.dumps(message), qid),
            )

    def _get(self, queue: str) -> dict:
        return self._take(queue, keep=queue not in self._no_ack_queues)

    def _take(self, queue: str, *, keep: bool) -> dict:
        """The queue's oldest visible message. ``keep``: the row stays, hidden and owned by this process,
        until the message is acknowledged; otherwise it is deleted now."""
        db, qid = self._db, self._queue_id(queue)
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + RECLAIM_SECONDS
            reclaim(db)
        while True:
            row = db.execute(
                "SELECT id FROM kombu_message WHERE queue_id = ? AND visible = 1 ORDER BY id LIMIT 1", (qid,)
            ).fetchone()
            if row is None:
                raise Empty()
            with _write(db):
                if keep:
                    taken = db.execute(
                        "UPDATE kombu_message SET visible = 0, owner = ? WHERE id = ? AND visible = 1 RETURNING payload",
                        (owner(), row[0]),
                    ).fetchall()
                else:
                    taken = db.execute("DELETE FROM kombu_message WHERE id = ? AND visible = 1 RETURNING payload", row).fetchall()
            if taken:
                payload = json.loads(taken[0][0])
                if keep:
                    payload.setdefault("properties", {})[ROW_PROPERTY] = row[0]
                return payload
            # another consumer took that one between the read and the update: read again

    def _row_of(self, delivery_tag: str) -> int | None:
        message = self.qos._delivered.get(delivery_tag)
        return None if message is None else message.properties.get(ROW_PROPERTY)

    def _delete_row(self, row: int) -> None:
        db = self._db
        with _write(db):
            db.execute("DELETE FROM kombu_message WHERE id = ?", (row,))

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        if queue is not None:
            self._no_ack_queues.discard(queue)
        return super().basic_cancel(consumer_tag)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        if not no_ack:
            return super().basic_get(queue, no_ack=False, **kwargs)
        try:
            return self.Message(self._take(queue, keep=False), channel=self)
        except Empty:
            return None

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        row = self._row_of(delivery_tag)
        if row is not None:
            self._delete_row(row)
        super().basic_ack(delivery_tag, multiple=multiple)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue and (row := self._row_of(delivery_tag)) is not None:
            self._delete_row(row)
        super().basic_reject(delivery_tag, requeue=requeue)  # requeue: shown again by _restore

    def _restore(self, message: Any) -> None:
        """Show a delivered message again, in its place in the queue (a close, a requeue)."""
        row = message.properties.get(ROW_PROPERTY)
        if row is None:
            super()._restore(message)
            return
        db = self._db
        with _write(db):
            db.execute("UPDATE kombu_message SET visible = 1, owner = NULL WHERE id = ? AND visible = 0", (row,))
            exists = db.execute("SELECT 1 FROM kombu_message WHERE id = ?", (row,)).fetchone()
        if exists is None:  # the file was made again meanwhile: the message goes in as new
            super()._restore(message)

    def held_messages(self) -> list[dict]:
        """Every message delivered to a consumer and not acknowledged yet (prefetched, in a batch
        buffer, or waiting for its countdown), as kombu message dicts."""
        return [json.loads(p) for (p,) in self._db.execute("SELECT payload FROM kombu_message WHERE visible = 0")]

    def _size(self, queue: str) -> int:
        return int(
            self._db.execute(
                "SELECT count(*) FROM kombu_message WHERE queue_id = ? AND visible = 1", (self._queue_id(queue),)
            ).fetchone()[0]
        )

    def _purge(self, queue: str) -> int:
        """Remove the queue's waiting messages (not the ones delivered and not yet acknowledged)."""
        db, qid = self._db, self._queue_id(queue)
        with _write(db):
            n = db.execute("DELETE FROM kombu_message WHERE queue_id = ? AND visible = 1", (qid,)).rowcount
        return int(n)

    def close(self) -> None:
        try:
            super().close()  # shows again what this channel delivered and nobody acknowledged
        finally:
            conn = getattr(self._local, "conn", None)
            if conn is not None and self._pid == os.getpid():
                conn.close()
                self._local.conn = None


class Transport(virtual.Transport):
    """kombu transport ``imgsync-sqlite``."""

    Channel = Channel
    can_parse_url = True  # the whole URL reaches the channel as ``hostname``
    default_port = 0
    polling_interval = POLLING_INTERVAL
    driver_type = "sql"
    driver_name = "sqlite"
    connection_errors = (sqlite3.OperationalError,)
    channel_errors = (sqlite3.DatabaseError,)

    def driver_version(self) -> str:
        return sqlite3.sqlite_version
