"""The encode worker's GPU gauge timer (the readings themselves need a GPU: tests/unit/encoders/test_cuda.py)."""

from __future__ import annotations

import logging
import time

import pytest
from kombu.asynchronous.timer import Timer

from worker.metrics import gpu_gauges
from worker.metrics.gpu_gauges import SAMPLE_SECONDS, GpuGauges


class _Consumer:
    """What the step takes from Celery's consumer: its timer (kombu's own)."""

    def __init__(self) -> None:
        self.timer = Timer()


def test_samples_on_the_consumer_timer_and_never_raises(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """start schedules a repeated reading on the consumer's timer; a reading that fails is logged, not raised
    (a timer callback must not take the worker down); stop cancels it."""
    step = object.__new__(GpuGauges)
    step.tref = None
    consumer = _Consumer()
    started = time.monotonic()
    step.start(consumer)
    entry = step.tref
    ((eta, _, _),) = consumer.timer.queue
    assert not entry.canceled and abs(eta - started - SAMPLE_SECONDS) < 1.0

    def broken(m):  # type: ignore[no-untyped-def]
        raise RuntimeError("NVML went away")

    monkeypatch.setattr(gpu_gauges, "record_gpu_memory", broken)
    with caplog.at_level(logging.WARNING):
        step.sample()
    assert "reading the GPU gauges failed" in caplog.text
    step.stop(consumer)
    assert step.tref is None and entry.canceled
