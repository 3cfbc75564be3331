"""The embedded broker (worker.embedded_broker): a kombu transport on one SQLite file, used by
several processes at once. Real SQLite files, real kombu connections, real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kombu import Connection

from worker import embedded_broker
from worker.celery_app import configure
from worker.embedded_broker import broker_url
from worker.procs import start_time


def _rows(path: Path) -> dict[int, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT visible, count(*) FROM kombu_message GROUP BY visible").fetchall())


def test_fifo_hidden_on_delivery_deleted_on_ack_and_wal(make_settings) -> None:
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
        assert _rows(path) == {0: 3, 1: 2}  # delivered: hidden until acknowledged
        for m in got:
            m.ack()
        assert _rows(path) == {1: 2}  # acknowledged: gone
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


def test_reject_deletes_or_requeues_in_place_and_purge_keeps_delivered(make_settings) -> None:
    settings = make_settings()
    url = configure(settings).conf.broker_url
    path = settings.broker_db_path
    with Connection(url) as conn:
        queue = conn.SimpleQueue("reject-test")
        for i in range(4):
            queue.put({"n": i})
        first, second = queue.get(timeout=5), queue.get(timeout=5)
        first.reject()  # dropped for good
        second.requeue()  # back at the head of the queue, before 2 and 3
        assert _rows(path) == {1: 3}
        again = queue.get(timeout=5)
        assert again.payload["n"] == 1
        assert queue.queue.purge() == 2  # the waiting 2 and 3; the delivered 1 stays
        assert _rows(path) == {0: 1}
        again.ack()
        queue.close()
    assert _rows(path) == {}


def test_no_ack_consumers_take_messages_for_good(make_settings) -> None:
    settings = make_settings()
    url = configure(settings).conf.broker_url
    with Connection(url) as conn:
        queue = conn.SimpleQueue("noack-test", no_ack=True)
        queue.put({"n": 1})
        assert queue.get(timeout=5).payload == {"n": 1}
        assert _rows(settings.broker_db_path) == {}
        channel = conn.channel()
        producer = conn.Producer(channel)
        producer.publish({"n": 2}, routing_key="noack-test")
        assert channel.basic_get("noack-test", no_ack=True).payload == {"n": 2}
        assert _rows(settings.broker_db_path) == {}
        channel.close()
        queue.close()


_TAKE_AND_HANG = """
import sys, time
import worker.embedded_broker
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    queue = conn.SimpleQueue("kill-test")
    held = [queue.get(timeout=10) for _ in range(int(sys.argv[2]))]
    print("taken", flush=True)
    time.sleep(600)
"""


def _take_and_hang(url: str, n: int) -> subprocess.Popen:
    """A consumer process that takes ``n`` messages, acknowledges none, and waits to be killed."""
    proc = subprocess.Popen([sys.executable, "-c", _TAKE_AND_HANG, url, str(n)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "taken"
    return proc


def test_messages_held_by_a_sigkilled_consumer_are_delivered_again(make_settings) -> None:
    """At-least-once across SIGKILL: a consumer killed outright (OOM killer) loses nothing. The rows
    it held stay hidden while it lives, and the next connection shows them again."""
    settings = make_settings()
    url = configure(settings).conf.broker_url
    path = settings.broker_db_path
    with Connection(url) as conn:
        queue = conn.SimpleQueue("kill-test")
        for i in range(5):
            queue.put({"n": i})
        queue.close()
    proc = _take_and_hang(url, 3)
    try:
        with Connection(url) as conn:  # connecting while the owner lives takes nothing of its
            queue = conn.SimpleQueue("kill-test")
            got = [queue.get(timeout=5) for _ in range(2)]
            assert [m.payload["n"] for m in got] == [3, 4]
            for m in got:
                m.ack()
            with pytest.raises(queue.Empty):
                queue.get(timeout=0.2)
            queue.close()
        assert _rows(path) == {0: 3}
    finally:
        proc.kill()
        proc.wait()
    with Connection(url) as conn:
        queue = conn.SimpleQueue("kill-test")
        got = [queue.get(timeout=5) for _ in range(3)]
        assert [m.payload["n"] for m in got] == [0, 1, 2]  # in their original order
        for m in got:
            m.ack()
        queue.close()
    assert _rows(path) == {}


def test_a_running_consumer_reclaims_what_a_killed_one_held(make_settings) -> None:
    """No restart needed: a consumer already polling picks the dead one's messages up within seconds."""
    settings = make_settings()
    url = configure(settings).conf.broker_url
    with Connection(url) as conn:
        queue = conn.SimpleQueue("kill-test")
        queue.put({"n": 7})
        proc = _take_and_hang(url, 1)
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.2)
        proc.kill()
        proc.wait()
        started = time.monotonic()
        msg = queue.get(timeout=4 * embedded_broker.RECLAIM_SECONDS)
        assert msg.payload == {"n": 7}
        assert time.monotonic() - started <= 2 * embedded_broker.RECLAIM_SECONDS + 1
        msg.ack()
        queue.close()
    assert _rows(settings.broker_db_path) == {}


def test_owner_identity_tells_a_reused_pid_or_a_zombie_from_a_live_owner() -> None:
    me = embedded_broker.owner()
    host, pid, start = me.rsplit("|", 2)
    assert int(pid) == os.getpid() and start
    assert embedded_broker.owner_alive(me)
    assert not embedded_broker.owner_alive(f"{host}|{pid}|{int(start) + 1}")  # same pid, another process
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    name = f"{host}|{child.pid}|{start_time(child.pid)}"
    assert embedded_broker.owner_alive(name)
    assert child.stdin is not None
    child.stdin.close()  # it exits; not reaped yet, it is a zombie (its pid still answers signals)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.02)
    os.kill(child.pid, 0)
    assert not embedded_broker.owner_alive(name)
    child.wait()
    assert not embedded_broker.owner_alive(name)
    assert embedded_broker.owner_alive(f"another-host|{os.getpid()}|1")  # cannot be judged from here
    assert not embedded_broker.owner_alive("not-an-owner")
