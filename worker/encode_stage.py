"""The encode stage: a micro-batch of preprocessed images through the model into Milvus and the
ledger, in three steps that write-behind can run apart (:mod:`worker.write_behind`):
:func:`start_encode` (stale items, pixels, forward pass queued), :func:`upsert_encode` (Milvus) and
:func:`record_encode` (ledger, SKU refresh). :func:`encode_batch` runs them in turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from schemas.reasons import Reason
from schemas.tasks import EncodePayload, PreprocessPayload
from worker.dispatch import Dispatcher
from worker.encoders.base import Encoder, PendingVectors
from worker.errors import ImgsyncError, TransientError
from worker.health import TRIPPING_REASONS, gate, probe_device
from worker.imaging.device_decode import JpegHandoff, decode_batch
from worker.index import ImageEntity
from worker.index.milvus_store import VersionNames
from worker.ledger import ImageState, IndexedImage, VersionRow
from worker.metrics import metrics
from worker.metrics.gpu_gauges import record_gpu_memory
from worker.pipeline import model_pixels, prepare_pixels, record_failure, restore_if_overtaken
from worker.runtime import Runtime

if TYPE_CHECKING:
    import torch

__all__ = [
    "encode_batch",
    "start_encode",
    "finish_encode",
    "StartedEncode",
    "StartedGroup",
    "upsert_encode",
    "record_encode",
    "UpsertedEncode",
    "EncodeResult",
]

log = logging.getLogger(__name__)


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
    # one event delivered twice into one batch: one vector per image and version (an upsert must
    # not name a primary key twice; the two may even differ, had the file changed between fetches)
    last = {(p.model_id, p.event.image_id): p for p in wanted}
    stale += [p.pixel_key for p in wanted if last[(p.model_id, p.event.image_id)] is not p]
    wanted = [p for p in wanted if last[(p.model_id, p.event.image_id)] is p]
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
    overtaken = {p.event.image_id: (p.content_hash, p.event.sku) for p in live if p.event.image_id not in done}
    if overtaken:  # a newer event came while we encoded: Milvus must not keep what we wrote
        gone, redo = rt.ledger.settle_overtaken(model_id, overtaken)
        rt.store.delete_images(names.images, gone)  # never resurrect a deleted or failed image
        for image_id in gone:  # unless a re-create was written in between: its vector just went
            restore_if_overtaken(rt, dispatch, image_id)
        if redo:  # a vector the ledger does not hold, whose newer event may have been "unchanged"
            dispatch.preprocess_many(
                [
                    PreprocessPayload(
                        event=r.event("repair"), request_id=r.request_id or "", force=True, models=[model_id]
                    )
                    for r in redo
                ]
            )
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
