"""The embedded SQLite broker: WAL mode, and delivered messages swept away (kombu only marks them
invisible, and its fetch walks past every one of them)."""

from __future__ import annotations

import sqlite3

from kombu import Connection

from worker.broker_sweep import sweep_delivered
from worker.celery_app import configure


def _rows(path) -> dict[int, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT visible, count(*) FROM kombu_message GROUP BY visible").fetchall())


def test_sweep_removes_delivered_messages_only(make_settings) -> None:
    settings = make_settings()
    app = configure(settings)
    path = settings.broker_db_path
    assert sweep_delivered(path) == 0  # no broker file yet
    with Connection(app.conf.broker_url, transport_options=app.conf.broker_transport_options) as conn:
        queue = conn.SimpleQueue("sweep-test")
        for i in range(5):
            queue.put({"n": i})
        for _ in range(3):
            queue.get(timeout=5).ack()
        assert _rows(path) == {0: 3, 1: 2}
        assert sweep_delivered(path) == 3
        assert _rows(path) == {1: 2}
        assert [queue.get(timeout=5).payload["n"] for _ in range(2)] == [3, 4]  # the rest still flows
        queue.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
