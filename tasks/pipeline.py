"""The pipeline tasks. Each validates its payload (in the base class) and calls one function."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from config.settings import BatchConfig
from schemas.tasks import PreprocessPayload, SkuRefreshPayload
from tasks.base import ImageBatches, ImageBatchTask, ImageTask, SkuTask, encode_payloads, even_chunks
from worker import pipeline
from worker.celery_app import app, dispatcher, runtime
from worker.dispatch import TASK_ENCODE, TASK_PREPROCESS, TASK_PREPROCESS_BATCH, TASK_REFRESH_SKU, Dispatcher
from worker.health import gate
from worker.ledger import KnownImage
from worker.write_behind import WriteBehind

__all__ = ["preprocess", "preprocess_batch", "encode", "refresh_sku", "apply_batching"]

log = logging.getLogger(__name__)


@app.task(name=TASK_PREPROCESS, base=ImageTask, bind=False)
def preprocess(payload: PreprocessPayload) -> str:
    return pipeline.preprocess(runtime(), dispatcher(), payload)


@app.task(name=TASK_PREPROCESS_BATCH, base=ImageBatchTask, bind=False)
def preprocess_batch(
    payload: PreprocessPayload, known: KnownImage | None = None, dispatch: Dispatcher | None = None
) -> str:
    """One item of a batch message (the base class runs it once per item, with the image's ledger
    rows read ahead for the batch, and a dispatcher that sends the batch's encodes together)."""
    return pipeline.preprocess(runtime(), dispatch or dispatcher(), payload, known)


@app.task(name=TASK_ENCODE, base=ImageBatches, flush_images=32, flush_interval=0.2, acks_late=True)
def encode(requests: list[Any]) -> dict[str, int]:
    """A micro-batch of encode messages, each one payload or several (``{"items": [...]}``), run as
    model batches of at most ``IMGSYNC_BATCH_MAX`` images, of even sizes.

    With write-behind (``IMGSYNC_ENCODE_OVERLAP``; on for CUDA) each started batch is written by
    the writer thread (:class:`worker.write_behind.WriteBehind`) while this thread goes on; the
    result says how many images are still being written (``held``) and how many of the latest
    flushes they come from (``held_flushes``), whose messages stay unacknowledged until then."""
    global _FLUSHES
    _FLUSHES += 1
    behind = _WRITER if encode.can_hold() else None
    payloads = [p for req in requests for p in encode_payloads(req.args, req.kwargs)]
    total: Counter[str] = Counter(indexed=0, skipped=0, retried=0, failed=0)
    chunks = even_chunks(payloads, int(encode.flush_images))
    try:
        for i, chunk in enumerate(chunks):
            if not gate().is_open():  # back-pressure: hand the rest back to the broker, attempts unchanged
                if behind is not None:
                    behind.drain()
                rest = [p for c in chunks[i:] for p in c]
                pipeline.requeue_encode(dispatcher(), rest)
                total["requeued"] += len(rest)
                break
            started = _start(chunk, total)
            if started is None:
                continue
            if behind is not None and (behind.images or encode.overlap == "on" or _on_device(started)):
                behind.submit(_FLUSHES, started)  # written in order, while this thread goes on
            else:
                total.update(_write(started))
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
            total["held_flushes"] = behind.open_flushes(_FLUSHES)
    return dict(total)


def _on_device(started: pipeline.StartedEncode) -> bool:
    return any(g.vectors.on_device for g in started.groups)


def _start(chunk: list[Any], total: Counter[str]) -> pipeline.StartedEncode | None:
    try:
        return pipeline.start_encode(runtime(), dispatcher(), chunk)
    except Exception:  # noqa: BLE001 - start_encode handles item faults; this is the ledger/broker itself
        log.exception("encode: batch of %d could not be started: re-publishing", len(chunk))
        pipeline.republish_encode(dispatcher(), runtime().settings, chunk)
        total["retried"] += len(chunk)
        return None


def _write(started: pipeline.StartedEncode) -> Counter[str]:
    """Write a started batch (wait for its vectors, upsert, record); its outcomes."""
    return _record(_upsert(started))


def _upsert(started: pipeline.StartedEncode) -> pipeline.UpsertedEncode | Counter[str]:
    """Write-behind's first stage: wait for the vectors, upsert them (or the outcomes, when the
    batch had to be re-published)."""
    try:
        return pipeline.upsert_encode(runtime(), dispatcher(), started)
    except Exception:  # noqa: BLE001 - upsert_encode handles group faults; this is the ledger/broker itself
        return _republish(started.payloads)


def _record(upserted: pipeline.UpsertedEncode | Counter[str]) -> Counter[str]:
    """Write-behind's second stage: record the upserted batch in the ledger; its outcomes."""
    if isinstance(upserted, Counter):
        return upserted
    try:
        return Counter(pipeline.record_encode(runtime(), dispatcher(), upserted).__dict__)
    except Exception:  # noqa: BLE001 - record_encode handles group faults; this is the ledger/broker itself
        return _republish(upserted.payloads)


def _republish(payloads: list[Any]) -> Counter[str]:
    log.exception("encode: batch of %d could not be written: re-publishing", len(payloads))
    pipeline.republish_encode(dispatcher(), runtime().settings, payloads)
    return Counter(retried=len(payloads))


#: the writer of this process (the solo pool's: task bodies run in the consumer's thread), and the
#: number of encode flushes run so far
_WRITER = WriteBehind(_upsert, _record)
_FLUSHES = 0


@app.task(name=TASK_REFRESH_SKU, base=SkuTask, bind=False)
def refresh_sku(payload: SkuRefreshPayload) -> str:
    results = pipeline.refresh_skus(runtime(), payload.all_skus)
    return ",".join(sorted(set(results.values())))


def apply_batching(cfg: BatchConfig) -> None:
    """Set the micro-batch limits from settings (celery-batches reads them at flush time)."""
    task = app.tasks[TASK_ENCODE]
    task.flush_images = cfg.max_size
    task.flush_interval = cfg.wait_seconds
    task.overlap = cfg.overlap
