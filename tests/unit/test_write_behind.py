"""The encode worker's writer threads: batches are written (in order with one writer), at most
``depth`` wait, and the flushes whose batches are not written yet are reported (their messages wait
for their acks)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import SimpleNamespace

from worker.write_behind import WriteBehind


def _batch(name: str, images: int = 2) -> SimpleNamespace:
    return SimpleNamespace(name=name, images=images)


def test_batches_are_written_in_order_in_one_thread_and_counted() -> None:
    """One stage: batches are written by the writer thread in the order submitted (the first being
    the slowest), and their outcome counts are collected once."""
    written: list[tuple[str, str]] = []

    def write(b):  # type: ignore[no-untyped-def]
        time.sleep(0.01 if b.name == "a" else 0)  # the first is the slowest: order must still hold
        written.append((b.name, threading.current_thread().name))
        return Counter(indexed=b.images)

    wb = WriteBehind(write, depth=3)
    for i, name in enumerate("abc"):
        wb.submit(i + 1, _batch(name))
    wb.drain()
    assert [n for n, _ in written] == ["a", "b", "c"]
    assert {t for _, t in written} == {written[0][1]} and written[0][1].startswith("imgsync-writer")
    assert wb.collect() == Counter(indexed=6) and wb.collect() == Counter() and wb.images == 0


def test_submit_waits_for_the_oldest_beyond_depth_and_open_flushes_counts_from_the_oldest_unwritten() -> None:
    """depth 2: the third batch is submitted only once the first is written; while batches of
    flushes 2 and 3 are unwritten, flush 3 reports 2 open flushes (2 and 3)."""
    release = {n: threading.Event() for n in "abc"}

    def write(b):  # type: ignore[no-untyped-def]
        assert release[b.name].wait(10)
        return Counter(indexed=b.images)

    wb = WriteBehind(write, depth=2)
    wb.submit(1, _batch("a"))
    wb.submit(2, _batch("b"))
    assert wb.open_flushes(2) == 2 and wb.images == 4
    threading.Timer(0.2, release["a"].set).start()
    started = time.monotonic()
    wb.submit(3, _batch("c", 3))  # waits for "a"
    assert time.monotonic() - started >= 0.15
    assert wb.open_flushes(3) == 2 and wb.images == 5
    release["b"].set()
    release["c"].set()
    wb.drain()
    assert wb.open_flushes(3) == 0 and wb.collect() == Counter(indexed=7)


def test_a_write_that_raises_is_logged_and_the_writer_goes_on(caplog) -> None:  # type: ignore[no-untyped-def]
    """write() handles its own faults; a bug in it (an exception escaping) is logged, the batch
    left to the redrive (its images stay pending in the ledger), and the next batch is written."""

    def write(b):  # type: ignore[no-untyped-def]
        if b.name == "bad":
            raise RuntimeError("a bug")
        return Counter(indexed=b.images)

    wb = WriteBehind(write)
    wb.submit(1, _batch("bad"))
    wb.submit(1, _batch("good"))
    wb.drain()
    assert wb.collect() == Counter(indexed=2)
    assert "writing a batch of 2 images failed unexpectedly" in caplog.text


def test_two_writers_write_batches_side_by_side_and_a_late_one_holds_its_flush_open() -> None:
    """writers=2: batch b is written while batch a is (a only ends once b has started); b finishing
    first leaves flush 1's a open, so flushes 1 and 2 both still wait for their acks; outcomes are
    collected once both are written."""
    b_started, a_release = threading.Event(), threading.Event()
    threads: set[str] = set()

    def write(b):  # type: ignore[no-untyped-def]
        threads.add(threading.current_thread().name)
        if b.name == "a":
            assert b_started.wait(10) and a_release.wait(10)
        else:
            b_started.set()
        return Counter(indexed=b.images)

    wb = WriteBehind(write, depth=3, writers=2)
    wb.submit(1, _batch("a"))
    wb.submit(2, _batch("b", 3))
    assert b_started.wait(10)
    deadline = time.monotonic() + 10
    while wb.images != 2 and time.monotonic() < deadline:  # b written, a not
        time.sleep(0.01)
    assert wb.images == 2 and wb.open_flushes(2) == 2 and wb.collect() == Counter()
    a_release.set()
    wb.drain()
    assert len(threads) == 2 and wb.collect() == Counter(indexed=5) and wb.open_flushes(2) == 0
