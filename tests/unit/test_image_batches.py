"""The encode task's micro-batching counts images: whole messages are grouped up to IMGSYNC_BATCH_MAX
images (the real task object; its flush is recorded instead of run, since no worker consumes here)."""

from __future__ import annotations

from queue import Queue
from types import SimpleNamespace

import pytest

import tasks.pipeline  # noqa: F401 - registers the encode task
from tasks.base import ImageBatches, even_chunks, images_in
from worker import celery_app
from worker.dispatch import IMAGES_HEADER, TASK_ENCODE


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
    monkeypatch.setattr(type(task).__mro__[1], "_do_flush", lambda self: seen.append(self._buffer.qsize()))
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
