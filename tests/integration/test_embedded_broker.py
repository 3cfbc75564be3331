"""The embedded broker (worker.embedded_broker): a kombu transport on one SQLite file, used by
several processes at once. Real SQLite files, real kombu connections, real processes."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest
from kombu import Connection

from worker.celery_app import configure
from worker.embedded_broker import broker_url


def _rows(path: Path) -> dict[int, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT visible, count(*) FROM kombu_message GROUP BY visible").fetchall())


def test_fifo_delete_on_delivery_and_wal(make_settings) -> None:
    settings = make_settings()
    app = configure(settings)
    path = settings.broker_db_path
    assert app.conf.broker_url == broker_url(path)
    with Connection(app.conf.broker_url) as conn:
        queue = conn.SimpleQueue("fifo-test")
        for i in range(5):
            queue.put({"n": i})
        assert _rows(path) == {1: 5}
        assert queue.qsize() == 5
        got = [queue.get(timeout=5) for _ in range(3)]
        assert [m.payload["n"] for m in got] == [0, 1, 2]
        assert _rows(path) == {1: 2}  # delivered messages leave the table at once
        for m in got:
            m.ack()
        rest = [queue.get(timeout=5) for _ in range(2)]
        assert [m.payload["n"] for m in rest] == [3, 4]
        for m in rest:
            m.ack()
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.1)
        queue.close()
    assert _rows(path) == {}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unacknowledged_messages_come_back_when_the_consumer_closes(make_settings) -> None:
    """kombu's virtual-transport guarantee, kept: what a consumer took and did not acknowledge is put
    back when its channel closes (a worker's warm shutdown)."""
    settings = make_settings()
    url = configure(settings).conf.broker_url
    with Connection(url) as conn:
        queue = conn.SimpleQueue("restore-test")
        for i in range(3):
            queue.put({"n": i})
        first = queue.get(timeout=5)
        first.ack()
        queue.get(timeout=5)  # taken, never acknowledged
        queue.close()
    with Connection(url) as conn:
        queue = conn.SimpleQueue("restore-test")
        got = [queue.get(timeout=5) for _ in range(2)]
        assert sorted(m.payload["n"] for m in got) == [1, 2]
        for m in got:
            m.ack()
        queue.close()
    assert _rows(settings.broker_db_path) == {}


def test_reads_a_file_left_by_kombus_sqlalchemy_transport(tmp_path: Path) -> None:
    """An install upgraded in place: messages waiting in the old transport's tables are delivered,
    the rows it had delivered (invisible) are removed."""
    path = tmp_path / "broker.db"
    with Connection(f"sqla+sqlite:///{path}") as conn:
        queue = conn.SimpleQueue("upgrade-test")
        for i in range(4):
            queue.put({"n": i})
        queue.get(timeout=5).ack()  # kombu marks it invisible and keeps the row
        queue.close()
    assert _rows(path) == {0: 1, 1: 3}
    with Connection(broker_url(path)) as conn:
        queue = conn.SimpleQueue("upgrade-test")
        got = [queue.get(timeout=5) for _ in range(3)]
        assert [m.payload["n"] for m in got] == [1, 2, 3]
        for m in got:
            m.ack()
        queue.close()
    assert _rows(path) == {}


def _consume(url: str, queue_name: str, out) -> None:  # type: ignore[no-untyped-def]
    import worker.embedded_broker  # noqa: F401 - registers the scheme in this process

    got = []
    with Connection(url) as conn:
        queue = conn.SimpleQueue(queue_name)
        while True:
            try:
                msg = queue.get(timeout=1.0)
            except queue.Empty:
                break
            got.append(msg.payload["n"])
            msg.ack()
        queue.close()
    out.put(got)


def test_concurrent_consumers_deliver_each_message_exactly_once(make_settings) -> None:
    """Four processes drain one queue while nothing else runs: every message reaches exactly one."""
    settings = make_settings()
    url = configure(settings).conf.broker_url
    n = 2000
    with Connection(url) as conn:
        queue = conn.SimpleQueue("race-test")
        for i in range(n):
            queue.put({"n": i})
        queue.close()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_consume, args=(url, "race-test", out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    delivered = sorted(x for r in results for x in r)
    assert delivered == list(range(n))  # none lost, none twice
    assert sum(1 for r in results if r) >= 2  # the work was really shared
    assert _rows(settings.broker_db_path) == {}


def test_a_broker_file_deleted_under_a_running_process_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "home" / "broker.db"
    for round_ in range(2):
        with Connection(broker_url(path)) as conn:
            queue = conn.SimpleQueue("again-test")
            queue.put({"round": round_})
            msg = queue.get(timeout=5)
            assert msg.payload == {"round": round_}
            msg.ack()
            queue.close()
        for f in path.parent.glob("broker.db*"):
            f.unlink()
