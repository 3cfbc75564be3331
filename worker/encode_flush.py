"""One encode micro-batch flush, as the encode task runs it: split into model batches, each started
(forward pass queued on the device), then written inline or, with write-behind, by the writer
threads (:class:`worker.write_behind.WriteBehind`) while the next one starts."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

from schemas.tasks import EncodePayload
from worker import encode_stage, pipeline
from worker.dispatch import Dispatcher
from worker.health import gate
from worker.runtime import Runtime
from worker.write_behind import WriteBehind

__all__ = ["EncodeFlusher", "even_chunks"]

log = logging.getLogger(__name__)


class EncodeFlusher:
    """Runs encode flushes in the encode worker's process. ``runtime`` and ``dispatcher`` give this
    process's runtime and dispatcher when called (they are built lazily, after the fork)."""

    def __init__(self, runtime: Callable[[], Runtime], dispatcher: Callable[[], Dispatcher]) -> None:
        self._rt, self._dispatch = runtime, dispatcher
        #: the writer threads (each writes a whole batch: Milvus and the ledger, under a claim),
        #: made on first use (:meth:`_writer`)
        self._behind: WriteBehind | None = None
        #: encode flushes run so far (the writer's batches are numbered by flush)
        self.flushes = 0

    def run(self, payloads: Sequence[EncodePayload], batch: int, *, hold: bool, overlap: str) -> dict[str, int]:
        """Encode ``payloads`` in model batches of at most ``batch`` images, of even sizes; the
        outcome counts. ``hold``: write-behind is allowed (the solo pool's process); ``overlap``:
        ``IMGSYNC_ENCODE_OVERLAP`` (``auto`` writes behind when the forward pass was queued on a
        device). With write-behind, ``held`` and ``held_flushes`` say how many images, of how many
        of the latest flushes (this one included), are still being written: those flushes'
        messages must wait for their acknowledgement. An empty flush (or a paused worker) waits
        for every write."""
        self.flushes += 1
        behind = self._writer() if hold else None
        total: Counter[str] = Counter(indexed=0, skipped=0, retried=0, failed=0)
        chunks = even_chunks(list(payloads), batch)
        try:
            for i, chunk in enumerate(chunks):
                if not gate().is_open():  # back-pressure: hand the rest back to the broker, attempts unchanged
                    if behind is not None:
                        behind.drain()
                    rest = [p for c in chunks[i:] for p in c]
                    pipeline.requeue_encode(self._dispatch(), rest)
                    total["requeued"] += len(rest)
                    break
                started = self._start(chunk, total)
                if started is None:
                    continue
                if behind is not None and (behind.images or overlap == "on" or _on_device(started)):
                    behind.submit(self.flushes, started)  # written while this thread goes on
                else:
                    total.update(self._write(started))
            if behind is not None and not (chunks and gate().is_open()):
                behind.drain()  # the idle timer's empty flush, or a paused worker: write everything now
        except BaseException:
            if behind is not None:
                behind.drain()  # never leave writes behind messages that are acknowledged on the way out
            raise
        if behind is not None:
            total.update(behind.collect())
            if held := behind.images:
                total["held"] = held
                total["held_flushes"] = behind.open_flushes(self.flushes)
        return dict(total)

    def _writer(self) -> WriteBehind:
        """Two writers where the ledger locks rows (batch k is recorded while batch k + 1 is
        upserted); one on SQLite, whose claim holds the whole file."""
        if self._behind is None:
            self._behind = WriteBehind(self._write, writers=2 if self._rt().ledger.locks_rows else 1)
        return self._behind

    def _start(self, chunk: list[EncodePayload], total: Counter[str]) -> encode_stage.StartedEncode | None:
        try:
            return encode_stage.start_encode(self._rt(), self._dispatch(), chunk)
        except Exception:  # noqa: BLE001 - start_encode handles item faults; this is the ledger/broker itself
            log.exception("encode: batch of %d could not be started: re-publishing", len(chunk))
            pipeline.republish_encode(self._dispatch(), self._rt().settings, chunk)
            total["retried"] += len(chunk)
            return None

    def _write(self, started: encode_stage.StartedEncode) -> Counter[str]:
        """The writer's step: wait for the vectors, upsert and record them; the outcome counts."""
        try:
            return Counter(encode_stage.finish_encode(self._rt(), self._dispatch(), started).__dict__)
        except Exception:  # noqa: BLE001 - finish_encode handles group faults; this is the ledger/broker itself
            return self._republish(started.payloads)

    def _republish(self, payloads: list[EncodePayload]) -> Counter[str]:
        log.exception("encode: batch of %d could not be written: re-publishing", len(payloads))
        pipeline.republish_encode(self._dispatch(), self._rt().settings, payloads)
        return Counter(retried=len(payloads))


def _on_device(started: encode_stage.StartedEncode) -> bool:
    return any(g.vectors.on_device for g in started.groups)


def even_chunks(items: list, most: int) -> list[list]:  # type: ignore[type-arg]
    """``items`` in as few chunks of at most ``most`` as possible, of sizes that differ by one at
    most (261 at 256: 131 + 130, not 256 + 5)."""
    if not items:
        return []
    k = -(-len(items) // max(1, most))
    size, extra = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out
