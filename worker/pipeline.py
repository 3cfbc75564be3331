"""The pipeline stages as plain functions over a :class:`Runtime` and a :class:`Dispatcher`:
preprocess one event, encode a micro-batch, refresh one SKU. Tasks call exactly one of these.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from schemas.events import Action, CropBox, ImageEvent
from schemas.reasons import Reason
from schemas.tasks import EncodePayload, PreprocessPayload
from worker.dispatch import Dispatcher
from worker.encoders.base import l2_normalize
from worker.errors import ImgsyncError, PermanentError, TransientError
from worker.fetch import fetch_bytes
from worker.imaging.decode import apply_crop, decode_image
from worker.imaging.trim import trim_border
from worker.index import ImageEntity
from worker.ledger import ImageState, IndexedImage
from worker.metrics import Metrics, metrics
from worker.metrics.collectors import gpu_memory_snapshot, nvml_snapshot
from worker.runtime import Runtime

__all__ = [
    "preprocess",
    "encode_batch",
    "refresh_sku",
    "prepare_pixels",
    "record_failure",
    "republish_encode",
    "backoff_seconds",
    "EncodeResult",
]

log = logging.getLogger(__name__)

#: Upper bound of a retry delay, seconds.
MAX_BACKOFF = 300.0
#: Rounds a SKU refresh repeats while its SKU keeps changing under it.
SKU_REFRESH_ROUNDS = 5


def backoff_seconds(attempt: int, base: float = 1.0) -> float:
    """Exponential backoff with jitter: 50–100 % of ``base * 2**attempt`` seconds, capped at MAX_BACKOFF."""
    return random.uniform(0.5, 1.0) * min(MAX_BACKOFF, base * (2**attempt))


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_pixels(rt: Runtime, data: bytes, crop: CropBox | None) -> np.ndarray:
    """Decode, crop (the catalog's box, else auto-trim of a uniform border) and fit one image's bytes
    to the model input (uint8 H×W×3)."""
    with metrics().stage_seconds.labels("decode").time():
        img = decode_image(data, rt.settings.imaging, min_side=decode_min_side(rt, crop))
        if crop is not None:
            img = apply_crop(img, crop)
        elif rt.settings.imaging.auto_trim:
            img = trim_border(img)
        return rt.encoder.preprocess([img])[0]


#: decode large JPEGs at a reduced scale that keeps this many times the model input (room for
#: auto-trim and for the final antialiased resize)
DECODE_HEADROOM = 3


def decode_min_side(rt: Runtime, crop: CropBox | None) -> int:
    """The smallest image side that still leaves the model input (after a crop) full detail."""
    need = DECODE_HEADROOM * max(rt.encoder.preprocess_cfg.size)
    if crop is not None:
        need = int(need / max(1e-3, min(crop.w, crop.h))) + 1
    return need


def fetch(rt: Runtime, uri: str) -> bytes:
    """The image's bytes (timed as the ``fetch`` stage)."""
    with metrics().stage_seconds.labels("fetch").time():
        return fetch_bytes(uri, rt.settings.fetch)


def prepare_pixels(rt: Runtime, event: ImageEvent) -> tuple[str, np.ndarray]:
    """Fetch and prepare one image: ``(content_hash, model-input pixels)``."""
    data = fetch(rt, event.uri)
    return content_hash(data), model_pixels(rt, data, event.crop)


def preprocess(rt: Runtime, dispatch: Dispatcher, payload: PreprocessPayload) -> str:
    """Record the event, then delete, skip (unchanged/stale) or hand pixels to the encode stage.

    Returns what happened: ``stale``, ``deleted``, ``unchanged`` or ``queued``.
    Raises PermanentError / TransientError for the instrumentation to record or retry.
    """
    event = payload.event
    if payload.attempt == 0:
        metrics().events.labels(event.source, str(event.action)).inc()
    acceptance = rt.ledger.accept(event, payload.request_id)
    if not acceptance.current:
        return "stale"
    if acceptance.left_sku is not None:
        dispatch.refresh_sku(acceptance.left_sku)
    if event.action is Action.delete:
        delete_image(rt, dispatch, event)
        return "deleted"
    data = fetch(rt, event.uri)
    digest = content_hash(data)
    prev = acceptance.previous
    if (
        not payload.force
        and prev is not None
        and prev.state == ImageState.indexed
        and prev.content_hash == digest
        and prev.model_id == rt.model_id
        and prev.sku == event.sku
    ):
        rt.ledger.mark_unchanged(event.image_id, event.version, payload.request_id)
        return "unchanged"
    key = rt.pixels.put(model_pixels(rt, data, event.crop))
    dispatch.encode(
        EncodePayload(event=event, request_id=payload.request_id, content_hash=digest, pixel_key=key)
    )
    return "queued"


def delete_image(rt: Runtime, dispatch: Dispatcher, event: ImageEvent) -> None:
    """Remove an image's vector from every model version, then record it and refresh its SKU."""
    names = rt.names()
    rt.store.delete_images(names.images, [event.image_id])
    sku = rt.ledger.mark_deleted(event.image_id, event.version)
    if sku is not None:
        dispatch.refresh_sku(sku)


@dataclass(frozen=True)
class EncodeResult:
    indexed: int
    skipped: int
    retried: int
    failed: int


def encode_batch(rt: Runtime, dispatch: Dispatcher, payloads: Sequence[EncodePayload]) -> EncodeResult:
    """Encode a micro-batch and write its vectors. Never raises: a bad item is failed or re-published
    on its own, and a failure of the whole batch (Milvus down, device error) re-publishes each item
    with backoff."""
    versions = rt.ledger.current_versions([p.event.image_id for p in payloads])
    live: list[EncodePayload] = []
    pixels: list[np.ndarray] = []
    skipped = failed = retried = 0
    for p in payloads:
        current = versions.get(p.event.image_id)
        if current is None or current[0] != p.event.version or current[1] == ImageState.deleted:
            skipped += 1  # a newer event owns this image now
            rt.pixels.delete(p.pixel_key)
            continue
        px = rt.pixels.get(p.pixel_key)
        if px is None:  # expired or evicted: redo the preprocessing here rather than fail
            try:
                digest, px = prepare_pixels(rt, p.event)
                p = p.model_copy(update={"content_hash": digest})
            except ImgsyncError as exc:
                outcome = record_failure(rt, dispatch, p, exc)
                failed += outcome == "failed"
                retried += outcome == "retried"
                continue
        live.append(p)
        pixels.append(px)
    if not live:
        _count_encode(skipped=skipped, retried=retried, failed=failed)
        return EncodeResult(0, skipped, retried, failed)
    m = metrics()
    try:
        with m.stage_seconds.labels("encode").time():
            vectors = rt.encoder.encode(pixels)
        names = rt.names()
        m.batch_size.labels(names.model_id).observe(len(pixels))
        record_gpu_memory(m)
        now_ms = int(time.time() * 1000)
        started = time.perf_counter()
        rt.store.upsert_images(
            names,
            [
                ImageEntity(
                    image_id=p.event.image_id,
                    sku=p.event.sku,
                    uri=p.event.uri,
                    vector=v,
                    content_hash=p.content_hash,
                    model_id=names.model_id,
                    indexed_at=now_ms,
                )
                for p, v in zip(live, vectors, strict=True)
            ],
        )
        m.stage_seconds.labels("upsert").observe(time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - the whole batch failed: each item retries alone
        err = exc if isinstance(exc, ImgsyncError) else TransientError(Reason.device_error, repr(exc))
        log.warning("encode batch of %d failed (%s): re-publishing each item", len(live), exc)
        for p in live:
            outcome = record_failure(rt, dispatch, p, err, keep_pixels=True)
            failed += outcome == "failed"
            retried += outcome == "retried"
        _count_encode(skipped=skipped, retried=retried, failed=failed)
        return EncodeResult(0, skipped, retried, failed)
    recorded, dirty = rt.ledger.mark_indexed(
        [
            IndexedImage(p.event.image_id, p.event.version, p.content_hash, names.model_id, p.request_id)
            for p in live
        ]
    )
    done = set(recorded)
    overtaken = [p.event.image_id for p in live if p.event.image_id not in done]
    if overtaken:  # a delete may have run while we encoded: never resurrect a deleted image
        now = rt.ledger.current_versions(overtaken)
        gone = [i for i in overtaken if now.get(i, ("", ImageState.deleted))[1] == ImageState.deleted]
        rt.store.delete_images(names.images, gone)
    now = time.time()
    for p in live:
        rt.pixels.delete(p.pixel_key)
        if p.event.image_id in done:
            m.lag_seconds.labels(names.model_id).observe(max(0.0, now - p.event.event_time.timestamp()))
    for sku in sorted(dirty):
        dispatch.refresh_sku(sku)
    result = EncodeResult(len(recorded), skipped + len(overtaken), retried, failed)
    _count_encode(indexed=result.indexed, skipped=result.skipped, retried=retried, failed=failed)
    return result


def _count_encode(**outcomes: int) -> None:
    for outcome, n in outcomes.items():
        if n:
            metrics().images.labels("encode", outcome).inc(n)


def record_gpu_memory(m: Metrics) -> None:
    """Set the GPU memory gauges from torch (nothing without CUDA)."""
    snapshot = gpu_memory_snapshot()
    for device, kinds in snapshot.items():
        for kind, value in kinds.items():
            m.gpu_memory.labels(device, kind).set(value)
    if snapshot:  # NVML only where torch sees a GPU
        for device, reading in nvml_snapshot().items():
            m.gpu_utilization.labels(device).set(reading["utilization"])
            m.gpu_temperature.labels(device).set(reading["temperature"])


def refresh_sku(rt: Runtime, sku: str) -> str:
    """Recompute a SKU vector as the normalized mean of its current image vectors (fetched by
    primary key). Repeats while the SKU changes under it, so the last write reads the newest
    membership. Returns ``clean``, ``written`` or ``deleted``."""
    with metrics().stage_seconds.labels("sku_refresh").time():
        result = _refresh_sku(rt, sku)
    metrics().images.labels("sku", result).inc()
    return result


def _refresh_sku(rt: Runtime, sku: str) -> str:
    names = rt.names()
    result = "clean"
    for _ in range(SKU_REFRESH_ROUNDS):
        dirty_gen, clean_gen = rt.ledger.sku_generation(sku)
        if dirty_gen <= clean_gen and result == "clean":
            return result
        members = rt.ledger.sku_members(sku)
        vectors = rt.store.image_vectors(names.images, members) if members else {}
        if len(vectors) < len(members):
            log.warning("sku %s: %d of %d member vectors missing in Milvus", sku, len(members) - len(vectors), len(members))
        if vectors:
            mean = l2_normalize(np.mean(np.stack([vectors[i] for i in sorted(vectors)]), axis=0))
            rt.store.upsert_sku(names, sku, mean, len(vectors))
            result = "written"
        else:
            rt.store.delete_sku(names, sku)
            result = "deleted"
        if not rt.ledger.finish_sku(sku, dirty_gen, len(vectors), names.model_id):
            return result
    raise TransientError(Reason.index_unavailable, f"sku {sku} kept changing during {SKU_REFRESH_ROUNDS} refreshes")


def record_failure(
    rt: Runtime,
    dispatch: Dispatcher,
    payload: PreprocessPayload | EncodePayload,
    exc: ImgsyncError,
    *,
    keep_pixels: bool = False,
) -> str:
    """Record a failed image: permanent errors at once; transient ones are re-published with backoff
    until ``IMGSYNC_MAX_RETRIES``, then recorded as ``retries_exhausted``.

    Returns ``failed`` or ``retried``.
    """
    event = payload.event
    if isinstance(exc, PermanentError):
        if rt.ledger.mark_failed(event.image_id, event.version, exc.reason, str(exc), payload.request_id):
            metrics().failures.labels(str(exc.reason)).inc()
        _drop_pixels(rt, payload)
        return "failed"
    reason = getattr(exc, "reason", Reason.fetch_error)
    attempts = rt.ledger.note_attempt(event.image_id, event.version, reason, str(exc))
    if payload.attempt >= rt.settings.max_retries:
        if rt.ledger.mark_failed(
            event.image_id,
            event.version,
            Reason.retries_exhausted,
            f"{payload.attempt + 1} attempts; last: {reason}: {exc}",
            payload.request_id,
        ):
            metrics().failures.labels(str(Reason.retries_exhausted)).inc()
        _drop_pixels(rt, payload)
        return "failed"
    delay = backoff_seconds(payload.attempt)
    log.info("retrying %s in %.1fs (attempt %d, ledger attempts %d): %s", event.uri, delay, payload.attempt + 1, attempts, exc)
    nxt = payload.model_copy(update={"attempt": payload.attempt + 1})
    if isinstance(nxt, EncodePayload) and keep_pixels:
        dispatch.encode(nxt, countdown=delay)
    elif isinstance(nxt, EncodePayload):
        dispatch.preprocess(
            PreprocessPayload(event=event, request_id=payload.request_id, attempt=nxt.attempt, force=True),
            countdown=delay,
        )
    else:
        dispatch.preprocess(nxt, countdown=delay)
    return "retried"


def republish_encode(dispatch: Dispatcher, max_retries: int, payloads: Sequence[EncodePayload]) -> None:
    """Send encode payloads again with backoff when even recording their failure was impossible."""
    for p in payloads:
        if p.attempt >= max_retries:
            log.error("giving up on %s after %d attempts (state store unavailable)", p.event.uri, p.attempt + 1)
            continue
        dispatch.encode(p.model_copy(update={"attempt": p.attempt + 1}), countdown=backoff_seconds(p.attempt))


def _drop_pixels(rt: Runtime, payload: PreprocessPayload | EncodePayload) -> None:
    if isinstance(payload, EncodePayload):
        rt.pixels.delete(payload.pixel_key)
