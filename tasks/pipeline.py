"""The pipeline tasks. Each validates its payload (in the base class) and calls one function."""

from __future__ import annotations

from typing import Any

from config.settings import BatchConfig
from schemas.tasks import PreprocessPayload, SkuRefreshPayload
from tasks.base import ImageBatches, ImageBatchTask, ImageTask, SkuTask, encode_payloads
from worker import pipeline, sku_refresh
from worker.celery_app import app, dispatcher, runtime
from worker.dispatch import TASK_ENCODE, TASK_PREPROCESS, TASK_PREPROCESS_BATCH, TASK_REFRESH_SKU, Dispatcher
from worker.encode_flush import EncodeFlusher
from worker.ledger import KnownImage

__all__ = ["preprocess", "preprocess_batch", "encode", "refresh_sku", "apply_batching"]


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
    model batches of at most ``IMGSYNC_BATCH_MAX`` images (:class:`worker.encode_flush.EncodeFlusher`;
    with write-behind, ``held_flushes`` in the result keeps messages unacknowledged until written)."""
    payloads = [p for req in requests for p in encode_payloads(req.args, req.kwargs)]
    return _FLUSHER.run(payloads, int(encode.flush_images), hold=encode.can_hold(), overlap=encode.overlap)


#: this process's encode flushes and their writer threads (used in the solo pool's process)
_FLUSHER = EncodeFlusher(runtime, dispatcher)


@app.task(name=TASK_REFRESH_SKU, base=SkuTask, bind=False)
def refresh_sku(payload: SkuRefreshPayload) -> str:
    results = sku_refresh.refresh_skus(runtime(), payload.all_skus)
    return ",".join(sorted(set(results.values())))


def apply_batching(cfg: BatchConfig) -> None:
    """Set the micro-batch limits from settings (celery-batches reads them at flush time)."""
    task = app.tasks[TASK_ENCODE]
    task.flush_images = cfg.max_size
    task.flush_interval = cfg.wait_seconds
    task.overlap = cfg.overlap
