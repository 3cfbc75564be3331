"""The pipeline stages as plain functions over a :class:`Runtime` and a :class:`Dispatcher`:
preprocess one event, encode a micro-batch, refresh one SKU. Tasks call exactly one of these.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from config.settings import Settings
from schemas.events import Action, CropBox, ImageEvent
from schemas.reasons import Reason
from schemas.tasks import EncodePayload, PreprocessPayload
from worker.dispatch import Dispatcher
from worker.encoders.base import Encoder, PendingVectors, l2_normalize
from worker.errors import ImgsyncError, PermanentError, TransientError
from worker.fetch import fetch_bytes
from worker.health import TRIPPING_REASONS, gate, probe_device
from worker.imaging.decode import decode_and_crop
from worker.imaging.device_decode import JpegHandoff, decode_batch, plan_handoff
from worker.index import ImageEntity
from worker.index.milvus_store import VersionNames
from worker.ledger import ImageRow, ImageState, IndexedImage, KnownImage, Ledger, VersionRow
from worker.metrics import Metrics, metrics
from worker.metrics.collectors import gpu_memory_snapshot, nvml_snapshot
from worker.runtime import Runtime

if TYPE_CHECKING:
    import torch

__all__ = [
    "submit",
    "preprocess",
    "read_ahead",
    "encode_batch",
    "start_encode",
    "finish_encode",
    "StartedEncode",
    "upsert_encode",
    "record_encode",
    "UpsertedEncode",
    "refresh_skus",
    "prepare_pixels",
    "record_failure",
    "republish_encode",
    "backoff_seconds",
    "EncodeResult",
]

log = logging.getLogger(__name__)

#: Rounds a SKU refresh repeats while its SKU keeps changing under it.
SKU_REFRESH_ROUNDS = 5


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
        metrics().events.labels(event.source, str(event.action)).inc()
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
        except ImgsyncError:
            rest.append(event)  # the worker records what is wrong with it
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
    """Remove an image's vector from every active model version, then record it and refresh its SKU."""
    remove_vectors(rt, [event.image_id])
    sku = rt.ledger.mark_deleted(event.image_id, event.version)
    if sku is not None:
        dispatch.refresh_sku(sku)


def remove_vectors(rt: Runtime, image_ids: Sequence[str]) -> None:
    """Delete images' vectors from every active version's collection."""
    for v in rt.active_versions():
        rt.store.delete_images(rt.names_for(v).images, image_ids)


@dataclass(frozen=True)
class EncodeResult:
    indexed: int
    skipped: int
    retried: int
    failed: int

    def __add__(self, other: EncodeResult) -> EncodeResult:
        return EncodeResult(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values(), strict=True)))


@dataclass
class StartedGroup:
    """One model version's share of a started micro-batch: its items and their queued vectors."""

    model_id: str
    version: VersionRow
    live: list[EncodePayload]
    vectors: PendingVectors
    launch_seconds: float
    #: items of the group failed or retried before the forward pass (JPEGs that would not decode)
    settled: EncodeResult


@dataclass
class StartedEncode:
    """A micro-batch whose forward passes are queued (:func:`start_encode`); :func:`finish_encode`
    writes it. ``settled``: the outcomes known at the start (stale, failed or retried items)."""

    payloads: list[EncodePayload]
    groups: list[StartedGroup]
    settled: EncodeResult

    @property
    def images(self) -> int:
        return sum(len(g.live) for g in self.groups)


def encode_batch(rt: Runtime, dispatch: Dispatcher, payloads: Sequence[EncodePayload]) -> EncodeResult:
    """Encode a micro-batch and write its vectors, grouped by model version. Never raises: a bad item
    is failed or re-published on its own, and a failure of a whole group (Milvus down, device error)
    re-publishes each of its items with backoff."""
    return finish_encode(rt, dispatch, start_encode(rt, dispatch, payloads))


def start_encode(rt: Runtime, dispatch: Dispatcher, payloads: Sequence[EncodePayload]) -> StartedEncode:
    """The first half of :func:`encode_batch`: sort out stale items, read the pixels, decode the
    handed-over JPEGs and queue each model version's forward pass on its device
    (:meth:`Encoder.encode_async`). On CUDA it returns while the device computes, and the caller
    can write the previous micro-batch meanwhile; :func:`finish_encode` then writes this one."""
    versions = rt.ledger.current_versions([p.event.image_id for p in payloads])
    entries: dict[str, list[tuple[EncodePayload, np.ndarray | JpegHandoff]]] = {}
    failed = retried = 0
    wanted: list[EncodePayload] = []
    stale: list[str] = []
    for p in payloads:
        current = versions.get(p.event.image_id)
        model_id = p.model_id or rt.serving().model_id
        if (
            current is None
            or current[0] != p.event.version
            or current[1] == ImageState.deleted
            or rt.version_for(model_id) is None  # a newer event owns the image, or the version retired
        ):
            stale.append(p.pixel_key)
            continue
        wanted.append(p.model_copy(update={"model_id": model_id}))
    rt.pixels.delete_many(stale)
    for p, px in zip(wanted, rt.pixels.get_many([p.pixel_key for p in wanted]), strict=True):
        if px is None:  # expired or evicted: redo the preprocessing here rather than fail
            try:
                digest, px = prepare_pixels(rt, p.event, rt.encoder_for(p.model_id))
                p = p.model_copy(update={"content_hash": digest})
            except ImgsyncError as exc:
                outcome = record_failure(rt, dispatch, p, exc)
                failed += outcome == "failed"
                retried += outcome == "retried"
                continue
        entries.setdefault(p.model_id, []).append((p, px))
    settled = EncodeResult(0, len(stale), retried, failed)
    groups: list[StartedGroup] = []
    for model_id, items in entries.items():
        group = _start_group(rt, dispatch, model_id, items)
        if isinstance(group, StartedGroup):
            groups.append(group)
        else:
            settled += group
    return StartedEncode(list(payloads), groups, settled)


def finish_encode(rt: Runtime, dispatch: Dispatcher, started: StartedEncode) -> EncodeResult:
    """The second half of :func:`encode_batch`: :func:`upsert_encode`, then :func:`record_encode`.
    Never raises for a group's fault (its items are retried alone)."""
    return record_encode(rt, dispatch, upsert_encode(rt, dispatch, started))


@dataclass
class UpsertedEncode:
    """A started micro-batch whose vectors are in Milvus (:func:`upsert_encode`): what
    :func:`record_encode` records. ``settled``: the outcomes known so far (failed groups included)."""

    payloads: list[EncodePayload]
    groups: list[tuple[StartedGroup, VersionNames]]
    settled: EncodeResult


def upsert_encode(rt: Runtime, dispatch: Dispatcher, started: StartedEncode) -> UpsertedEncode:
    """Wait for each group's vectors and upsert them into Milvus; a group that fails (device error,
    Milvus down) has its items retried alone."""
    settled = started.settled
    done: list[tuple[StartedGroup, VersionNames]] = []
    for group in started.groups:
        names = _upsert_group(rt, dispatch, group)
        if isinstance(names, EncodeResult):
            settled += names
        else:
            done.append((group, names))
    return UpsertedEncode(started.payloads, done, settled)


def record_encode(rt: Runtime, dispatch: Dispatcher, upserted: UpsertedEncode) -> EncodeResult:
    """Record upserted groups in the ledger, drop their pixels, ask for the SKU refresh; count the
    batch's outcomes."""
    total = upserted.settled
    for group, names in upserted.groups:
        total += _record_group(rt, dispatch, group, names)
    _count_encode(indexed=total.indexed, skipped=total.skipped, retried=total.retried, failed=total.failed)
    return total


def _start_group(
    rt: Runtime, dispatch: Dispatcher, model_id: str, entries: list[tuple[EncodePayload, np.ndarray | JpegHandoff]]
) -> StartedGroup | EncodeResult:
    """Decode the group's handed-over JPEGs and queue its forward pass; the outcome instead when
    nothing is left to encode or the whole group failed."""
    live = [p for p, _ in entries]  # the items whose outcome is still open
    failed = retried = 0
    try:
        version = rt.version_for(model_id)
        if version is None:
            raise TransientError(Reason.index_unavailable, f"model version {model_id} is no longer active")
        encoder = rt.encoder_for(model_id)
        items, failed, retried = _decode_handoffs(rt, dispatch, encoder, entries)
        live = [p for p, _ in items]
        if not items:
            return EncodeResult(0, 0, retried, failed)
        started = time.perf_counter()
        vectors = encoder.encode_async([px for _, px in items])
        launch = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - the whole group failed: each item retries alone
        return EncodeResult(0, 0, retried, failed) + _group_failed(rt, dispatch, model_id, live, exc)
    return StartedGroup(model_id, version, live, vectors, launch, EncodeResult(0, 0, retried, failed))


def _upsert_group(rt: Runtime, dispatch: Dispatcher, group: StartedGroup) -> VersionNames | EncodeResult:
    """Wait for a started group's vectors and upsert them: the collections written, or the
    group's outcome when it failed (each item retried alone)."""
    m = metrics()
    model_id, live = group.model_id, group.live
    try:
        started = time.perf_counter()
        vectors = group.vectors.result()
        m.stage_seconds.labels("encode").observe(group.launch_seconds + time.perf_counter() - started)
        names = rt.names_for(group.version)
        m.batch_size.labels(model_id).observe(len(live))
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
                    model_id=model_id,
                    indexed_at=now_ms,
                )
                for p, v in zip(live, vectors, strict=True)
            ],
        )
        m.stage_seconds.labels("upsert").observe(time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - the whole group failed: each item retries alone
        return group.settled + _group_failed(rt, dispatch, model_id, live, exc)
    return names


def _record_group(rt: Runtime, dispatch: Dispatcher, group: StartedGroup, names: VersionNames) -> EncodeResult:
    """Record an upserted group in the ledger (an image deleted meanwhile leaves Milvus again), drop
    its pixels, observe its lag, ask for its SKUs' refresh."""
    m = metrics()
    model_id, live = group.model_id, group.live
    recorded, dirty = rt.ledger.mark_indexed(
        [IndexedImage(p.event.image_id, p.event.version, p.content_hash, model_id, p.request_id) for p in live]
    )
    done = set(recorded)
    overtaken = [p.event.image_id for p in live if p.event.image_id not in done]
    if overtaken:  # a delete may have run while we encoded: never resurrect a deleted image
        now = rt.ledger.current_versions(overtaken)
        gone = [i for i in overtaken if now.get(i, ("", ImageState.deleted))[1] == ImageState.deleted]
        rt.store.delete_images(names.images, gone)
    now = time.time()
    rt.pixels.delete_many([p.pixel_key for p in live])
    for p in live:
        if p.event.image_id in done:
            m.lag_seconds.labels(model_id).observe(max(0.0, now - p.event.event_time.timestamp()))
    if dirty:
        dispatch.refresh_skus(sorted(dirty))  # one message for the batch's SKUs
    return group.settled + EncodeResult(len(recorded), len(overtaken), 0, 0)


def _group_failed(
    rt: Runtime, dispatch: Dispatcher, model_id: str, live: list[EncodePayload], exc: Exception
) -> EncodeResult:
    """A whole group failed (Milvus down, device error): each of its open items retries alone, and
    a device or index fault pauses the worker."""
    err = exc if isinstance(exc, ImgsyncError) else TransientError(Reason.device_error, repr(exc))
    if err.reason in TRIPPING_REASONS:
        gate().trip(f"{err.reason}: {err}")  # stop taking work until a probe passes
    log.warning("encode batch of %d (%s) failed (%s): re-publishing each item", len(live), model_id, exc)
    failed = retried = 0
    for p in live:
        outcome = record_failure(rt, dispatch, p, err, keep_pixels=True)
        failed += outcome == "failed"
        retried += outcome == "retried"
    return EncodeResult(0, 0, retried, failed)


def _decode_handoffs(
    rt: Runtime, dispatch: Dispatcher, encoder: Encoder, entries: list[tuple[EncodePayload, np.ndarray | JpegHandoff]]
) -> tuple[list[tuple[EncodePayload, np.ndarray | torch.Tensor]], int, int]:
    """The group's model inputs: handed-over JPEGs decoded in one batch on the encoder's device; a
    picture the device refuses is decoded from the same bytes on the CPU, and a file that fails
    there too is recorded with its reason. Returns ``(items, failed, retried)``."""
    jpegs = [(i, e) for i, (_, e) in enumerate(entries) if isinstance(e, JpegHandoff)]
    if not jpegs:
        return list(entries), 0, 0  # type: ignore[arg-type]
    limits = rt.settings.imaging
    with metrics().stage_seconds.labels("device_decode").time():
        decoded = decode_batch(
            [(e, entries[i][0].event.crop) for i, e in jpegs],
            encoder.preprocess_cfg,
            encoder.load().device,
            auto_trim=limits.auto_trim,
            max_chunk_pixels=limits.device_chunk_pixels,
        )
    refused = [px for px in decoded if isinstance(px, Exception)]
    if len(refused) == len(decoded) and (broken := probe_device(str(encoder.device))) is not None:
        # not the files: the device itself (the whole group retries, and the worker pauses)
        raise TransientError(Reason.device_error, f"JPEG decode on {broken}") from refused[0]
    items: list[tuple[EncodePayload, np.ndarray | torch.Tensor] | None] = list(entries)  # type: ignore[arg-type]
    failed = retried = fallbacks = 0
    for (i, handoff), px in zip(jpegs, decoded, strict=True):
        p = entries[i][0]
        if isinstance(px, Exception):
            fallbacks += 1
            log.info("device decode of %s failed (%s: %s): decoding it on the CPU", p.event.uri, type(px).__name__, px)
            try:
                px = model_pixels(rt, handoff.data, p.event.crop, encoder)
            except ImgsyncError as exc:
                outcome = record_failure(rt, dispatch, p, exc)
                failed += outcome == "failed"
                retried += outcome == "retried"
                items[i] = None
                continue
        items[i] = (p, px)
    counter = metrics().images
    counter.labels("device_decode", "decoded").inc(len(jpegs) - fallbacks)
    if fallbacks:
        counter.labels("device_decode", "fallback").inc(fallbacks)
    return [it for it in items if it is not None], failed, retried


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


def refresh_skus(rt: Runtime, sku_ids: Sequence[str]) -> dict[str, str]:
    """Recompute SKU vectors as the normalized mean of their current image vectors (fetched by primary
    key), for many SKUs at once: one membership query, one vector fetch and one upsert per version for
    all of them. Repeats for the SKUs that changed under it, so the last write reads the newest
    membership. Returns ``sku -> clean|written|deleted``."""
    with metrics().stage_seconds.labels("sku_refresh").time():
        results = _refresh_skus(rt, sorted(set(sku_ids)))
    for result in results.values():
        metrics().images.labels("sku", result).inc()
    return results


def _refresh_skus(rt: Runtime, sku_ids: list[str]) -> dict[str, str]:
    results = dict.fromkeys(sku_ids, "clean")
    gens = rt.ledger.sku_generations(sku_ids)
    todo = [s for s in sku_ids if gens[s][0] > gens[s][1]]  # the others are clean already
    for _ in range(SKU_REFRESH_ROUNDS):
        if not todo:
            return results
        versions = rt.active_versions()
        counts: dict[str, dict[str, int]] = {}
        for version in versions:  # every active version keeps its SKU vectors true
            outcome, counts[version.model_id] = _refresh_skus_in(rt, version, todo)
            results.update(outcome)
        serving = versions[0]
        todo = rt.ledger.finish_skus(
            [(s, gens[s][0], counts[serving.model_id][s]) for s in todo], serving.model_id
        )
        if todo:
            gens.update(rt.ledger.sku_generations(todo))
    raise TransientError(
        Reason.index_unavailable, f"sku(s) {', '.join(todo[:5])} kept changing during {SKU_REFRESH_ROUNDS} refreshes"
    )


def _refresh_skus_in(rt: Runtime, version: VersionRow, sku_ids: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """Write (or delete) one version's vectors of ``sku_ids``; returns what happened and image counts."""
    names = rt.names_for(version)
    members = rt.ledger.sku_members_many(sku_ids, version.model_id)
    wanted = [i for ids in members.values() for i in ids]
    vectors = rt.store.image_vectors(names.images, wanted) if wanted else {}
    outcome: dict[str, str] = {}
    counts: dict[str, int] = {}
    rows: list[tuple[str, np.ndarray, int]] = []
    for sku in sku_ids:
        held = [vectors[i] for i in members[sku] if i in vectors]  # members are sorted by image id
        if len(held) < len(members[sku]):
            log.warning(
                "sku %s: %d of %d member vectors missing in %s",
                sku, len(members[sku]) - len(held), len(members[sku]), names.images,
            )  # fmt: skip
        counts[sku] = len(held)
        outcome[sku] = "written" if held else "deleted"
        if held:
            rows.append((sku, l2_normalize(np.mean(np.stack(held), axis=0)), len(held)))
    if rows:
        rt.store.upsert_skus(names, rows)
    rt.store.delete_skus(names, [s for s in sku_ids if outcome[s] == "deleted"])
    return outcome, counts


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
            _leave_index(rt, dispatch, event)
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
    dispatch.refresh_sku(event.sku)


def _drop_pixels(rt: Runtime, payload: PreprocessPayload | EncodePayload) -> None:
    if isinstance(payload, EncodePayload):
        rt.pixels.delete(payload.pixel_key)
