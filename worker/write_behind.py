"""Write-behind for the encode worker: started micro-batches are written (vectors waited for, upserted
into Milvus and recorded in the ledger under a claim of their rows) by writer threads, while the
worker's main thread receives the next messages and starts the next forward passes.

Each batch is written whole by one writer (:func:`worker.encode_stage.finish_encode`); with two
writers, batch k + 1 is upserted while batch k is recorded. Their order needs no thread of its own:
the ledger claim makes an image's writes follow its versions (a writer holding an image's row
makes the other wait for it), and on SQLite the claim holds the whole file, so the writers take
turns. On CUDA a started batch's forward pass runs on the GPU; the writer waits for its vectors
(``PendingVectors.result()``, without the GIL). The writers spend most of their time waiting for
Milvus and the database (network round trips, also without the GIL). The main thread meanwhile
takes the next messages from the broker, reads the ledger and the pixel store and queues the next
forward pass. Nothing is acknowledged before it is written: the task reports how many of its most recent
flushes still have batches being written (``open_flushes``), and the micro-batcher
(:class:`tasks.base.ImageBatches`) holds those messages' acknowledgements until then.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from worker.encode_stage import StartedEncode

__all__ = ["WriteBehind"]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    flush: int
    images: int
    future: Future[Counter[str]]


class WriteBehind:
    """Writes started batches with ``write`` (which returns a batch's outcome counts) on ``writers``
    threads. At most ``depth`` batches are submitted and not yet written: :meth:`submit` waits for
    the oldest beyond that (so a slow Milvus slows the worker instead of piling up pixels and device
    memory). Outcomes are collected in submission order. Used from one thread (the encode worker's
    main thread)."""

    def __init__(self, write: Callable[[StartedEncode], Counter[str]], *, depth: int = 3, writers: int = 1) -> None:
        self._write = write
        self._depth = max(1, depth)
        self._writers = max(1, writers)
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: deque[_Job] = deque()
        self._done: Counter[str] = Counter()

    def submit(self, flush: int, started: StartedEncode) -> None:
        """Queue ``started`` (from flush number ``flush``) for writing."""
        while len(self._jobs) >= self._depth:
            self._settle_oldest()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._writers, thread_name_prefix="imgsync-writer")
        self._jobs.append(_Job(flush, started.images, self._pool.submit(self._write, started)))

    def drain(self) -> None:
        """Wait until everything submitted is written."""
        while self._jobs:
            self._settle_oldest()

    def collect(self) -> Counter[str]:
        """The outcomes of the batches written since the last call (finished jobs leave the queue)."""
        while self._jobs and self._jobs[0].future.done():
            self._settle_oldest()
        out, self._done = self._done, Counter()
        return out

    @property
    def images(self) -> int:
        """Images submitted and not yet written."""
        return sum(j.images for j in self._jobs if not j.future.done())

    def open_flushes(self, current: int) -> int:
        """How many of the most recent flushes, up to ``current``, are not wholly written: their
        messages must not be acknowledged yet (from the oldest unwritten one on, since writers may
        finish out of order)."""
        undone = [j.flush for j in self._jobs if not j.future.done()]
        return current - min(undone) + 1 if undone else 0

    def _settle_oldest(self) -> None:
        """Wait for the oldest job, count its outcomes, drop it."""
        job = self._jobs[0]
        try:
            self._done.update(job.future.result())
        except Exception:  # noqa: BLE001 - write() handles its faults; a bug in it must not stop the worker
            # the images stay pending in the ledger, and the redrive sends them again
            log.exception("encode: writing a batch of %d images failed unexpectedly", job.images)
        self._jobs.popleft()
