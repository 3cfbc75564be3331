"""Back-pressure for the encode worker: when Milvus or the model device fails, stop taking messages
instead of burning every image's retries, and resume when a health probe passes.

The encode task trips the process's :class:`Gate` when a batch fails for an infrastructure reason
(``index_unavailable``, ``device_error``). The :class:`BackPressure` consumer step, run by the worker's
event loop every ``IMGSYNC_HEALTH_PROBE_SECONDS``, then cancels the worker's consumer of the encode
queue (new messages wait in the broker), probes Milvus and the device, and re-adds the consumer once
both answer. Messages the worker already holds (a buffered batch, retries waiting for their ETA) are
put back on the queue with their attempt count unchanged while the gate is closed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from celery import bootsteps

from schemas.reasons import Reason

__all__ = ["BackPressure", "Gate", "gate", "probe_device", "probe_runtime", "TRIPPING_REASONS"]

log = logging.getLogger(__name__)

#: failure reasons that say "the infrastructure is down", not "this image is bad"
TRIPPING_REASONS = frozenset({Reason.index_unavailable, Reason.device_error})


class Gate:
    """Open: take work. Closed: a dependency failed; hold work until ``probe`` answers None (healthy).

    ``probe`` returns None when healthy, else a short reason text. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed_since: float | None = None
        self.reason = ""

    def is_open(self) -> bool:
        return self._closed_since is None

    def trip(self, reason: str) -> None:
        with self._lock:
            if self._closed_since is None:
                self._closed_since = time.monotonic()
                self.reason = reason
                log.warning("encode paused: %s", reason)

    def try_reopen(self, probe: Callable[[], str | None]) -> bool:
        """Probe when closed; open on success. Returns whether the gate is open afterwards."""
        if self._closed_since is None:
            return True
        problem = probe()
        if problem is not None:
            self.reason = problem
            return False
        with self._lock:
            held = time.monotonic() - (self._closed_since or time.monotonic())
            self._closed_since = None
            log.warning("encode resumed after %.1f s (health probe passed)", held)
        return True

    def closed_for(self) -> float:
        since = self._closed_since
        return 0.0 if since is None else time.monotonic() - since


_gate = Gate()


def gate() -> Gate:
    """This process's gate."""
    return _gate


def probe_device(device: str) -> str | None:
    """None when the model device runs a tiny kernel; else why not."""
    import torch

    try:
        x = torch.ones(8, device=device)
        float((x * 2).sum().item())
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any fault means "not usable now"
        return f"device {device}: {exc}"
    return None


def probe_runtime() -> str | None:
    """Probe what the encode stage needs: the Milvus server and the model device."""
    from worker.celery_app import runtime

    rt = runtime()
    if not rt.store.ping():
        return f"Milvus at {rt.store.uri} does not answer"
    return probe_device(str(rt.encoder.device))


class BackPressure(bootsteps.StartStopStep):
    """Consumer step of the encode worker: cancel/re-add the encode queue's consumer with the gate."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(parent, **kwargs)
        self.tref = None
        self.paused = False

    def start(self, c) -> None:  # type: ignore[no-untyped-def]
        from worker.celery_app import settings
        from worker.metrics import metrics

        s = settings()
        self.queue = s.queues.encode
        metrics().encode_paused.set(0)  # the series exists from the start: an alert can tell 0 from absent
        self.tref = c.timer.call_repeatedly(s.health_probe_seconds, self.tick, (c,), priority=10)

    def tick(self, c, probe: Callable[[], str | None] = probe_runtime) -> None:  # type: ignore[no-untyped-def]
        from worker.metrics import metrics

        g = gate()
        try:
            if not g.is_open() and not self.paused:
                c.cancel_task_queue(self.queue)
                self.paused = True
                metrics().encode_paused.set(1)
            if self.paused and g.try_reopen(probe):
                c.add_task_queue(self.queue)
                self.paused = False
                metrics().encode_paused.set(0)
        except Exception:  # noqa: BLE001 - a timer callback must never take the worker down
            log.exception("back-pressure check failed; will try again")

    def stop(self, c) -> None:  # type: ignore[no-untyped-def]
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
