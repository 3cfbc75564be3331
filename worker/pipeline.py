"""The pipeline's preprocess stage and what every stage shares, as plain functions over a
:class:`Runtime` and a :class:`Dispatcher`: submit events, preprocess them (fetch, decode, crop,
fit to the model), record a failure or retry. The encode stage is :mod:`worker.encode_stage`, the
SKU stage :mod:`worker.sku_refresh`. Tasks call exactly one function of these modules.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image

from config.settings import Settings
from schemas.events import Action, CropBox, ImageEvent
from schemas.reasons import Reason, final_reason
from schemas.tasks import EncodePayload, PreprocessPayload
from worker.dispatch import Dispatcher
from worker.encoders.base import Encoder
from worker.errors import ImgsyncError, PermanentError
from worker.fetch import fetch_bytes
from worker.imaging.decode import decode_and_crop
from worker.imaging.device_decode import JpegHandoff, plan_handoff
from worker.index.milvus_store import CollectionMissing
from worker.ledger import ImageRow, ImageState, KnownImage, Ledger, VersionRow
from worker.metrics import metrics
from worker.runtime import Runtime

__all__ = [
    "submit",
    "preprocess",
    "read_ahead",
    "prepare_pixels",
    "model_pixels",
    "record_failure",
    "requeue_encode",
    "republish_encode",
    "remove_vectors",
    "restore_if_overtaken",
    "backoff_seconds",
]

log = logging.getLogger(__name__)

#: the ``source`` label values of ``imgsync_events_total``: imgsync's own sources and CLI paths;
#: any other producer's name counts as ``other`` (a label must come from a small fixed set)
EVENT_SOURCES = frozenset(
    {"cli", "sqs", "webhook", "outbox", "folder", "reindex", "redrive", "replay", "repair"}
)


def event_source_label(source: str) -> str:
    """``source`` as a metrics label: one of :data:`EVENT_SOURCES`, else ``other``."""
    return source if source in EVENT_SOURCES else "other"


def backoff_seconds(attempt: int, cap: float, base: float = 1.0) -> float:
    """Exponential backoff with jitter: 50–100 % of ``base * 2**attempt`` seconds, capped at ``cap``
    (IMGSYNC_RETRY_BACKOFF_MAX)."""
    return random.uniform(0.5, 1.0) * min(cap, base * (2**attempt))


def content_hash(data: bytes, crop: CropBox | None = None) -> str:
    """What the vector depends on besides the model: the bytes, and the catalog's crop box."""
    h = hashlib.sha256(data)
    if crop is not None:
        h.update(b"\0crop:" + crop.model_dump_json().encode())
    return h.hexdigest()


def decode_for(rt: Runtime, data: bytes, crop: CropBox | None, encoders: Sequence[Encoder]) -> Image.Image:
    """Decode, then crop (the catalog's box, else auto-trim of a uniform border), at a scale that
    leaves every one of ``encoders`` full detail."""
    with metrics().stage_seconds.labels("decode").time():
        min_side = max(decode_min_side(e, crop) for e in encoders)
        return decode_and_crop(data, rt.settings.imaging, crop, min_side=min_side)


def model_pixels(rt: Runtime, data: bytes, crop: CropBox | None, encoder: Encoder | None = None) -> np.ndarray:
    """Decode, crop and fit one image's bytes to a model's input (uint8 H×W×3); default: the
    configured model."""
    encoder = encoder or rt.encoder
    return encoder.preprocess([decode_for(rt, data, crop, [encoder])])[0]


#: decode large JPEGs at a reduced scale that keeps this many times the model input (room for
#: auto-trim and for the final antialiased resize). 2 rather than 3: 20 % less preprocessing time
#: on 1–12 MP photos, vectors unchanged (cos ≥ 0.999997 to the full-resolution path, ViT-B-32)
DECODE_HEADROOM = 2


def decode_min_side(encoder: Encoder, crop: CropBox | None) -> int:
    """The smallest image side that still leaves the model input (after a crop) full detail."""
    need = DECODE_HEADROOM * max(encoder.preprocess_cfg.size)
    if crop is not None:
        need = int(need / max(1e-3, min(crop.w, crop.h))) + 1
    return need


def jpeg_handoff(rt: Runtime, data: bytes, encoder: Encoder) -> JpegHandoff | None:
    """With ``IMGSYNC_JPEG_DECODE=encoder``: the JPEG to hand to the encode stage undecoded, when its
    header shows the device path renders it as the CPU path would; else None (decode here)."""
    limits = rt.settings.imaging
    if limits.jpeg_decode != "encoder":
        return None
    return plan_handoff(data, limits, encoder.preprocess_cfg, max_bytes=limits.handoff_max_bytes)


def fetch(rt: Runtime, uri: str) -> bytes:
    """The image's bytes (timed as the ``fetch`` stage)."""
    with metrics().stage_seconds.labels("fetch").time():
        return fetch_bytes(uri, rt.settings.fetch)


def prepare_pixels(rt: Runtime, event: ImageEvent, encoder: Encoder | None = None) -> tuple[str, np.ndarray]:
    """Fetch and prepare one image for a model: ``(content_hash, model-input pixels)``."""
    data = fetch(rt, event.uri)
    return content_hash(data, event.crop), model_pixels(rt, data, event.crop, encoder)


def submit(
    ledger: Ledger, dispatch: Dispatcher, events: Sequence[ImageEvent], request_id: str, *, force: bool = False
) -> list[ImageEvent]:
    """Record events in the ledger, then publish the ones still current to the preprocess queue.

    Recording first means that an event whose message a broker loses (kombu's Redis transport pops
    a message before it records it as taken) is waiting in the ledger, where the redrive finds it.
    Stale events are answered ``unchanged`` at once and not published. Returns the published events.
    """
    accepted = ledger.accept_many(events, request_id)
    dispatch.preprocess_many(
        [PreprocessPayload(event=ev, request_id=request_id, force=force) for ev in accepted.current]
    )
    if accepted.left_skus:
        dispatch.refresh_skus(accepted.left_skus)
    return accepted.current


def read_ahead(rt: Runtime, payloads: Sequence[PreprocessPayload]) -> dict[str, KnownImage]:
    """The ledger's view of a batch message's images, read in one transaction (two queries) instead
    of two reads per image: for new upserts whose image is in the batch once (an image twice sees
    its first item's effects by reading for itself; a background build reads as it always does).
    Keyed by image id; :func:`preprocess` takes an entry as ``known``."""
    count = Counter(p.event.image_id for p in payloads)
    ids = [
        p.event.image_id
        for p in payloads
        if not p.models and p.event.action is Action.upsert and count[p.event.image_id] == 1
    ]
    return rt.ledger.known_images(ids) if ids else {}


def preprocess(
    rt: Runtime, dispatch: Dispatcher, payload: PreprocessPayload, known: KnownImage | None = None
) -> str:
    """Record the event, then delete, skip (unchanged/stale) or hand pixels to the encode stage, once
    per active model version that does not hold the image's current vector yet.

    A payload limited to some ``models`` (a background build) is no new event: it re-encodes the
    image as the ledger has it, and only if that is still current. ``known``: the image's row and
    held vectors read ahead for a batch (:func:`read_ahead`), used instead of reading them here; a
    read ahead is as good as one made here a moment later, since every write that follows is
    conditional on the event's version and a vector written meanwhile only costs a second encode.

    Returns what happened: ``stale``, ``deleted``, ``unchanged`` or ``queued``.
    Raises PermanentError / TransientError for the instrumentation to record or retry.
    """
    event = payload.event
    build = bool(payload.models)
    if payload.attempt == 0 and not build:
        metrics().events.labels(event_source_label(event.source), str(event.action)).inc()
    if build:
        prev = rt.ledger.get(event.image_id)
        if (
            prev is None
            or prev.version != event.version
            or prev.state in (ImageState.deleted, ImageState.failed)
            or event.action is Action.delete  # its own delete, on its way: nothing to build
        ):
            return "stale"
    else:
        acceptance = rt.ledger.accept(event, payload.request_id, known.row if known is not None else None)
        if not acceptance.current:
            return "stale"
        if acceptance.left_sku is not None:
            dispatch.refresh_sku(acceptance.left_sku)
        if event.action is Action.delete:
            delete_image(rt, dispatch, event)
            return "deleted"
        prev = acceptance.previous
    versions = [v for v in rt.active_versions() if not build or v.model_id in payload.models]
    if build and len(versions) < len(set(payload.models)):  # registered after this worker last read them
        rt.forget_versions()
        versions = [v for v in rt.active_versions() if v.model_id in payload.models]
    if not versions:
        return "stale"  # the version being built was retired meanwhile
    data = fetch(rt, event.uri)
    digest = content_hash(data, event.crop)
    held = known.held if known is not None and not build else rt.ledger.vector_rows(event.image_id)
    serving = rt.serving().model_id
    need = [
        v for v in versions if payload.force or not _holds(v.model_id, held, digest, event, prev, serving, build=build)
    ]
    if not build and all(v.model_id != serving for v in need):
        rt.ledger.mark_unchanged(event.image_id, event.version, payload.request_id)
    if not need:
        return "unchanged"
    encoders = [rt.encoder_for(v.model_id) for v in need]
    img: Image.Image | None = None
    for v, enc in zip(need, encoders, strict=True):
        entry: np.ndarray | JpegHandoff | None = jpeg_handoff(rt, data, enc)
        if entry is None:
            img = img or decode_for(rt, data, event.crop, encoders)
            entry = enc.preprocess([img])[0]
        key = rt.pixels.put(entry)
        dispatch.encode(
            EncodePayload(
                event=event, request_id=payload.request_id, content_hash=digest, pixel_key=key, model_id=v.model_id
            )
        )
    return "queued"


def _holds(
    model_id: str,
    held: dict[str, tuple[str, str]],
    digest: str,
    event: ImageEvent,
    prev: ImageRow | None,
    serving: str,
    *,
    build: bool = False,
) -> bool:
    """True when version ``model_id`` already holds the vector of this content and SKU. For the
    serving version, a new event (not a background build) also needs the image indexed under that
    SKU before it (``prev``)."""
    if held.get(model_id) != (digest, event.sku):
        return False
    if model_id == serving and not build:
        return prev is not None and prev.state == ImageState.indexed and prev.sku == event.sku
    return True


def settle_unchanged(rt: Runtime, events: Sequence[ImageEvent], request_id: str) -> list[ImageEvent]:
    """Record at once, in this process, the events of local files whose content every active version
    already holds (outcome ``unchanged``, as the preprocess stage would); return the others, to be
    published. A re-index of an unchanged local catalog then costs no broker message, no decode and
    no forward pass. Anything else (new, changed, failed, deleted, remote, unreadable) is returned."""
    rest: list[ImageEvent] = []
    versions: list[VersionRow] | None = None  # read once, when the first indexed image needs them
    serving = ""
    for event in events:
        prev = rt.ledger.get(event.image_id) if event.action is Action.upsert and event.uri.startswith("file://") else None
        if prev is None or prev.state != ImageState.indexed or prev.sku != event.sku or prev.version > event.version:
            rest.append(event)
            continue
        try:
            digest = content_hash(fetch_bytes(event.uri, rt.settings.fetch), event.crop)
        except Exception:  # noqa: BLE001 - typed or not, the worker records what is wrong with it
            rest.append(event)
            continue
        if versions is None:
            versions, serving = rt.active_versions(), rt.serving().model_id
        held = rt.ledger.vector_rows(event.image_id)
        if not all(_holds(v.model_id, held, digest, event, prev, serving) for v in versions):
            rest.append(event)
            continue
        acceptance = rt.ledger.accept(event, request_id)
        if acceptance.current:
            rt.ledger.mark_unchanged(event.image_id, event.version, request_id)
    return rest


def delete_image(rt: Runtime, dispatch: Dispatcher, event: ImageEvent) -> None:
    """Remove an image's vector from every active model version, then record it and refresh its SKU.
    When a newer upsert overtook the delete meanwhile, that image is encoded again (its vectors are gone)."""
    remove_vectors(rt, [event.image_id])
    sku = rt.ledger.mark_deleted(event.image_id, event.version)
    if sku is not None:
        dispatch.refresh_sku(sku)
        return
    restore_if_overtaken(rt, dispatch, event.image_id)


def restore_if_overtaken(rt: Runtime, dispatch: Dispatcher, image_id: str) -> None:
    """After an image's vectors were removed for its delete or failure: when a newer upsert was
    accepted meanwhile (and may have been written, or found unchanged, before the removal), the
    ledger stops counting on its vectors and its newest event runs again."""
    row = rt.ledger.vectors_lost(image_id)
    if row is not None:
        dispatch.preprocess(PreprocessPayload(event=row.event("repair"), request_id=row.request_id or "", force=True))


def remove_vectors(rt: Runtime, image_ids: Sequence[str]) -> None:
    """Delete images' vectors from every active version's collection."""
    for v in rt.active_versions():
        rt.store.delete_images(rt.names_for(v).images, image_ids)


def record_failure(
    rt: Runtime,
    dispatch: Dispatcher,
    payload: PreprocessPayload | EncodePayload,
    exc: ImgsyncError,
    *,
    keep_pixels: bool = False,
) -> str:
    """Record a failed image: permanent errors at once; transient ones are re-published with backoff
    until ``IMGSYNC_MAX_RETRIES``, then recorded as ``retries_exhausted`` (``fetch_timeout`` when
    the last attempt timed out: :func:`schemas.reasons.final_reason`).

    Returns ``failed`` or ``retried``.
    """
    event = payload.event
    if isinstance(exc, CollectionMissing):
        log.warning("%s; its collections are made again on the next attempt", exc)
        rt.forget_collections()
    if isinstance(exc, PermanentError):
        if rt.ledger.mark_failed(event.image_id, event.version, exc.reason, str(exc), payload.request_id):
            metrics().failures.labels(str(exc.reason)).inc()
            _leave_index(rt, dispatch, event)
        _drop_pixels(rt, payload)
        return "failed"
    reason = getattr(exc, "reason", Reason.fetch_error)
    attempts = rt.ledger.note_attempt(event.image_id, event.version, reason, str(exc))
    if payload.attempt >= rt.settings.max_retries:
        final = final_reason(reason)
        if rt.ledger.mark_failed(
            event.image_id, event.version, final, f"{payload.attempt + 1} attempts; last: {reason}: {exc}", payload.request_id
        ):
            metrics().failures.labels(str(final)).inc()
            _leave_index(rt, dispatch, event)
        _drop_pixels(rt, payload)
        return "failed"
    delay = backoff_seconds(payload.attempt, rt.settings.retry_backoff_max)
    metrics().retries.labels(str(reason)).inc()
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


def requeue_encode(dispatch: Dispatcher, payloads: Sequence[EncodePayload]) -> None:
    """Put encode payloads back on their queue as they are (no attempt used): the worker is paused."""
    dispatch.encode_many(list(payloads))
    if payloads:
        metrics().images.labels("encode", "requeued").inc(len(payloads))


def republish_encode(dispatch: Dispatcher, settings: Settings, payloads: Sequence[EncodePayload]) -> None:
    """Send encode payloads again with backoff when even recording their failure was impossible."""
    for p in payloads:
        if p.attempt >= settings.max_retries:
            log.error("giving up on %s after %d attempts (state store unavailable)", p.event.uri, p.attempt + 1)
            continue
        delay = backoff_seconds(p.attempt, settings.retry_backoff_max)
        dispatch.encode(p.model_copy(update={"attempt": p.attempt + 1}), countdown=delay)


def _leave_index(rt: Runtime, dispatch: Dispatcher, event: ImageEvent) -> None:
    """A failed image keeps no vector (its old one would answer searches for content that is gone)."""
    try:
        remove_vectors(rt, [event.image_id])
    except ImgsyncError as exc:  # Milvus down: `imgsync verify` reports the leftover vector
        log.warning("could not remove the vectors of failed image %s: %s", event.uri, exc)
    else:
        restore_if_overtaken(rt, dispatch, event.image_id)
    dispatch.refresh_sku(event.sku)


def _drop_pixels(rt: Runtime, payload: PreprocessPayload | EncodePayload) -> None:
    if isinstance(payload, EncodePayload):
        rt.pixels.delete(payload.pixel_key)
