"""Write-behind for the encode worker: started micro-batches are written (vectors waited for, upserted
into Milvus, recorded in the ledger) by threads of their own, in order, while the worker's main
thread receives the next messages and starts the next forward passes.

Writing is a chain of stages, one thread each (the encode worker's: upsert into Milvus, then record
in the ledger), so that batch k is recorded while batch k + 1 is upserted. On CUDA a started
batch's forward pass runs on the GPU; the first stage waits for its vectors
(``PendingVectors.result()``, without the GIL). The stages spend most of their time waiting for
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
from typing import Any

from worker.encode_stage import StartedEncode

__all__ = ["WriteBehind"]

log = logging.getLogger(__name__)


def _then(stage: Callable[[Any], Any], previous: Future[Any]) -> Any:
    """Run ``stage`` on what the previous stage returned (its exception, if it raised, passes on)."""
    return stage(previous.result())


@dataclass
class _Job:
    flush: int
    images: int
    future: Future[Counter[str]]


class WriteBehind:
    """Writes started batches through ``stages`` (each stage's result is the next one's argument;
    the last returns the batch's outcome counts), one thread per stage, in the order the batches
    were submitted. At most ``depth`` batches are submitted and not yet written: :meth:`submit`
    waits for the oldest beyond that (so a slow Milvus slows the worker instead of piling up pixels
    and device memory). Used from one thread (the encode worker's main thread)."""

    def __init__(self, *stages: Callable[[Any], Any], depth: int = 3) -> None:
        self._stages = stages
        self._depth = max(1, depth)
        self._pools: list[ThreadPoolExecutor] = []
        self._jobs: deque[_Job] = deque()
        self._done: Counter[str] = Counter()

    def submit(self, flush: int, started: StartedEncode) -> None:
        """Queue ``started`` (from flush number ``flush``) for writing after what is queued."""
        while len(self._jobs) >= self._depth:
            self._settle_oldest()
        if not self._pools:
            self._pools = [
                ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"imgsync-writer-{i}") for i in range(len(self._stages))
            ]
        future: Future[Any] = self._pools[0].submit(self._stages[0], started)
        for pool, stage in zip(self._pools[1:], self._stages[1:], strict=True):
            future = pool.submit(_then, stage, future)  # each stage's thread takes batches in order
        self._jobs.append(_Job(flush, started.images, future))

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
        messages must not be acknowledged yet (jobs finish in order, so they are a suffix)."""
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
