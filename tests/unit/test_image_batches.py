"""The encode task's micro-batching counts images: whole messages are grouped up to IMGSYNC_BATCH_MAX
images (the real task object; its flush is recorded instead of run, since no worker consumes here)."""

from __future__ import annotations

import os
import uuid
from queue import Queue
from time import monotonic
from types import SimpleNamespace

import pytest
from celery_batches import Batches

import tasks.pipeline  # noqa: F401 - registers the encode task
from tasks.base import ImageBatches, images_in
from worker import celery_app
from worker.dispatch import IMAGES_HEADER, TASK_ENCODE
from worker.encode_flush import even_chunks


def _req(images: int | None, eta: object = None) -> SimpleNamespace:
    headers = {} if images is None else {IMAGES_HEADER: images}
    return SimpleNamespace(eta=eta, request_dict=headers, images=images or 1)


@pytest.fixture
def task(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    t = celery_app.app.tasks[TASK_ENCODE]
    assert isinstance(t, ImageBatches)
    flushed: list[list[int]] = []
    monkeypatch.setattr(t, "_buffer", Queue())
    monkeypatch.setattr(t, "_pending", Queue())
    monkeypatch.setattr(t, "flush_images", 32)
    monkeypatch.setattr(t, "flush", lambda reqs: flushed.append([r.images for r in reqs]))
    t.flushed = flushed  # type: ignore[attr-defined]
    return t


def _wait(task, sizes: list[int | None]) -> None:  # type: ignore[no-untyped-def]
    for k in sizes:
        task._buffer.put(_req(k))
    task._images = sum(k or 1 for k in sizes)


def test_whole_messages_fill_groups_and_the_rest_waits(task) -> None:  # type: ignore[no-untyped-def]
    """Messages of 7 images at a batch of 32: a group of 4 messages (28 images) runs, the fifth
    message waits for the next group; single-image messages count one each."""
    _wait(task, [7, 7, 7, 7, 7])
    task._flush_full()
    assert task.flushed == [[7, 7, 7, 7]] and task._buffer.qsize() == 1 and task._images == 7
    for _ in range(25):  # single-image messages behind the waiting 7
        task._buffer.put(_req(None))
    task._images += 25
    task._flush_full()
    assert task.flushed[-1] == [7] + [1] * 25 and task._buffer.qsize() == 0 and task._images == 0


def test_exact_groups_and_an_oversized_message_run_alone(task) -> None:  # type: ignore[no-untyped-def]
    """16 + 16 fills a group of 32 exactly; a message of 40 images runs in a group of its own (the
    task body splits it); nothing waits when the groups come out full."""
    _wait(task, [16, 16, 40, 16, 16])
    task._flush_full()
    assert task.flushed == [[16, 16], [40], [16, 16]] and task._buffer.qsize() == 0 and task._images == 0


def test_a_retry_with_a_countdown_leaves_the_flush_to_celery_batches(task, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A buffered message with an ETA (a retry's countdown): the whole buffer goes through
    celery-batches' own flush, which holds back what is not due."""
    seen: list[int] = []
    monkeypatch.setattr(Batches, "_do_flush", lambda self: seen.append(self._buffer.qsize()))
    _wait(task, [16, 16])
    task._buffer.put(_req(1, eta="2099-01-01T00:00:00+00:00"))
    task._flush_full()
    assert seen == [3] and task.flushed == []


@pytest.mark.parametrize(("headers", "want"), [(None, 1), ({}, 1), ({IMAGES_HEADER: 9}, 9), ({IMAGES_HEADER: "x"}, 1), ({IMAGES_HEADER: 0}, 1)])
def test_images_a_message_carries(headers: object, want: int) -> None:
    """The count comes from the message header; a message without one (or a bad one) counts one."""
    assert images_in(headers) == want


@pytest.mark.parametrize(("n", "most", "want"), [(0, 32, []), (5, 2, [2, 2, 1]), (32, 32, [32]), (35, 32, [18, 17]), (261, 256, [131, 130])])
def test_even_chunks(n: int, most: int, want: list[int]) -> None:
    """A flush larger than a model batch is split into as few chunks as possible, of even sizes."""
    assert [len(c) for c in even_chunks(list(range(n)), most)] == want


class _Req:
    """A buffered request: what SimpleRequest.from_request reads, and its acknowledgement recorded."""

    def __init__(self, name: str, acked: list[str]) -> None:
        self.name, self._acked = name, acked
        self.id, self._payload, self.delivery_info, self.hostname = name, ((name,), {}, {}), {}, "test"
        self.reply_to = self.correlation_id = None
        self.request_dict: dict = {}
        self.eta = None
        self.task = SimpleNamespace(acks_late=True)

    def acknowledge(self) -> None:
        self._acked.append(self.name)


@pytest.fixture
def holding():  # type: ignore[no-untyped-def]
    """An ImageBatches task on a real solo pool whose body says how many of the latest flushes are
    still being written, as told (``holds``)."""
    from celery.concurrency.solo import TaskPool

    calls: list[list[str]] = []
    holds: list[int] = []  # what each run says: how many of the latest flushes are still being written

    @celery_app.app.task(name=f"test.holding.{uuid.uuid4().hex}", base=ImageBatches, acks_late=True, shared=False)
    def body(requests):  # type: ignore[no-untyped-def]
        calls.append([r.args[0] for r in requests])
        return {"held_flushes": int(holds.pop(0))}

    body._buffer, body._pending, body._held = Queue(), Queue(), []
    body._pool = TaskPool()
    body.overlap, body._solo_pid = "on", os.getpid()
    body.calls, body.holds = calls, holds  # type: ignore[attr-defined]
    return body


def test_held_messages_are_acknowledged_after_the_flush_that_writes_them(holding) -> None:  # type: ignore[no-untyped-def]
    """A body that holds its writes: its messages stay unacknowledged until the next flush (which
    writes them) returns; a body that holds nothing has its own and the held ones acknowledged."""
    acked: list[str] = []
    holding.holds.extend([True, True, False])
    holding.flush([_Req("a", acked), _Req("b", acked)])
    assert acked == []
    holding.flush([_Req("c", acked)])
    assert acked == ["a", "b"]
    holding.flush([_Req("d", acked)])
    assert acked == ["a", "b", "c", "d"] and holding.calls == [["a", "b"], ["c"], ["d"]]


def test_the_idle_timer_writes_what_is_held(holding) -> None:  # type: ignore[no-untyped-def]
    """No message came since the held flush: the first quiet tick runs an empty flush (the body
    writes what it held), then the held messages are acknowledged; not the tick right after the
    flush, which comes before the next messages are read."""
    acked: list[str] = []
    holding.flush_interval = 0.2
    holding.holds.extend([True, False])
    holding.flush([_Req("a", acked)])
    holding._do_flush()  # the tick right after the flush: the next messages may be about to be read
    assert holding.calls == [["a"]] and acked == []
    holding._last_activity = monotonic() - 0.05  # a quiet tick (a quarter of the wait)
    holding._do_flush()
    assert holding.calls == [["a"], []] and acked == ["a"] and holding._held == []
    holding._do_flush()  # nothing held, nothing waiting: no flush at all
    assert holding.calls == [["a"], []]


def test_nothing_is_held_outside_the_solo_pool_process(holding) -> None:  # type: ignore[no-untyped-def]
    """In another process than the consumer's (a prefork child) or with overlap off, the flush is
    celery-batches' own: acknowledged when the body returns, whatever it says."""
    acked: list[str] = []
    for overlap, pid in (("on", os.getpid() + 1), ("off", os.getpid())):
        holding.overlap, holding._solo_pid = overlap, pid
        assert not holding.can_hold()
        holding.holds.append(True)
        holding.flush([_Req(overlap, acked)])
    assert acked == ["on", "off"] and holding._held == []


def test_a_part_filled_batch_waits_the_whole_interval_not_the_next_tick(holding) -> None:  # type: ignore[no-untyped-def]
    """The timer ticks 4 times per IMGSYNC_BATCH_WAIT_MS: messages that came 10 ms ago at a 200 ms
    wait stay buffered (a stream fills the batch meanwhile); once the oldest has waited 200 ms,
    the tick runs them."""
    acked: list[str] = []
    holding.flush_interval = 0.2
    holding.holds.extend([False])
    holding._buffer.put(_Req("a", acked))
    holding._waiting_since = holding._last_activity = monotonic() - 0.01
    holding._do_flush()
    assert holding.calls == [] and holding._buffer.qsize() == 1
    holding._waiting_since = monotonic() - 0.2
    holding._do_flush()
    assert holding.calls == [["a"]] and acked == ["a"] and holding._waiting_since is None


def test_a_quiet_tick_writes_the_held_batch_while_a_young_one_waits(holding) -> None:  # type: ignore[no-untyped-def]
    """A trickle: a batch is held and one message came 150 ms ago (the part-filled batch has not
    waited its 200 ms): the tick writes what is held (nothing came for a tick) and leaves the
    young message waiting."""
    acked: list[str] = []
    holding.flush_interval = 0.2
    holding.holds.extend([True, False])
    holding.flush([_Req("a", acked)])
    holding._buffer.put(_Req("b", acked))
    holding._waiting_since = holding._last_activity = monotonic() - 0.15
    holding._do_flush()
    assert holding.calls == [["a"], []] and acked == ["a"] and holding._buffer.qsize() == 1


def test_two_flushes_being_written_keep_both_unacknowledged(holding) -> None:  # type: ignore[no-untyped-def]
    """The writer thread is behind by two flushes (one being written, one waiting for the device):
    neither flush's messages are acknowledged; when it reports one, the older one is."""
    acked: list[str] = []
    holding.holds.extend([1, 2, 1, 0])
    holding.flush([_Req("a", acked)])
    holding.flush([_Req("b", acked)])
    assert acked == []
    holding.flush([_Req("c", acked)])
    assert acked == ["a", "b"]
    holding.flush([])
    assert acked == ["a", "b", "c"] and holding._held == []
