"""The embedded broker: a kombu transport on one SQLite file, for the embedded mode.

kombu's own SQLAlchemy transport was the embedded mode's ceiling (measured, BENCHMARKS.md): every
fetch, on an empty queue too, opened ``BEGIN IMMEDIATE`` and held SQLite's one write lock through an
ORM query, a flush and a commit, so with a dozen worker processes everything queued behind that lock
(about 120 tasks/s on a 16-core GPU machine, 1 % GPU utilisation). It also never deleted a delivered
message, only marked it invisible, and every later fetch walked past all of them.

This transport keeps kombu's tables (``kombu_queue``, ``kombu_message``: a file written by either one
reads in the other) and changes how they are used:

- a fetch reads the queue's oldest message outside any write lock, then takes it with one
  ``DELETE … RETURNING`` statement; if another consumer took it first, it reads again;
- writers wait for the lock in sub-millisecond steps (``worker.ledger.db.begin_immediate``), not in
  SQLite's own sleeps that grow to 100 ms;
- an empty queue costs one indexed read and takes no lock;
- a delivered message is deleted at once. Delivery guarantees are kombu's, unchanged: the message
  waits unacknowledged in the consumer's memory, and a consumer that closes puts back what it did not
  acknowledge (kombu's virtual-transport ``restore_unacked``), as it did with the invisible rows.

URL: ``imgsync-sqlite:///absolute/path/broker.db``. Importing this module registers the scheme.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, virtual

from worker.ledger.db import SQLITE_BUSY_TIMEOUT_MS, begin_immediate, sqlite_pragmas

__all__ = ["SCHEME", "Transport", "broker_url"]

SCHEME = "imgsync-sqlite"
TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"

#: seconds between polls of empty queues: a poll is one indexed read and takes no lock
POLLING_INTERVAL = 0.02

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


def _connect(path: Path) -> sqlite3.Connection:
    """A connection to the broker file, its tables made if missing (once per connection: cheap, and
    right even when the file was deleted and made again under a running process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    sqlite_pragmas(conn)
    with _write(conn):
        for stmt in _SCHEMA:
            conn.execute(stmt)
        # messages kombu's SQLAlchemy transport delivered and left behind (invisible)
        conn.execute("DELETE FROM kombu_message WHERE visible = 0")
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
        db, qid = self._db, self._queue_id(queue)
        with _write(db):
            db.execute(
                "INSERT INTO kombu_message (visible, timestamp, payload, version, queue_id) VALUES (1, ?, ?, 1, ?)",
                (datetime.now().isoformat(sep=" "), json.dumps(message), qid),
            )

    def _get(self, queue: str) -> dict:
        db, qid = self._db, self._queue_id(queue)
        while True:
            row = db.execute(
                "SELECT id FROM kombu_message WHERE queue_id = ? AND visible = 1 ORDER BY id LIMIT 1", (qid,)
            ).fetchone()
            if row is None:
                raise Empty()
            with _write(db):
                taken = db.execute("DELETE FROM kombu_message WHERE id = ? AND visible = 1 RETURNING payload", row).fetchall()
            if taken:
                return json.loads(taken[0][0])
            # another consumer took that one between the read and the delete: read again

    def _size(self, queue: str) -> int:
        return int(
            self._db.execute(
                "SELECT count(*) FROM kombu_message WHERE queue_id = ? AND visible = 1", (self._queue_id(queue),)
            ).fetchone()[0]
        )

    def _purge(self, queue: str) -> int:
        db, qid = self._db, self._queue_id(queue)
        with _write(db):
            n = db.execute("DELETE FROM kombu_message WHERE queue_id = ? AND visible = 1", (qid,)).rowcount
            db.execute("DELETE FROM kombu_message WHERE queue_id = ?", (qid,))
        return int(n)

    def close(self) -> None:
        try:
            super().close()  # puts back what this channel delivered and nobody acknowledged
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
