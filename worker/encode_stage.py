"""The encode stage: a micro-batch of preprocessed images through the model into Milvus and the
ledger, in two steps that write-behind can run apart (:mod:`worker.write_behind`):
:func:`start_encode` (stale items, pixels, forward pass queued) and :func:`finish_encode` (Milvus and
the ledger, under a claim of the images' rows; SKU refresh). :func:`encode_batch` runs them in turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from schemas.reasons import Reason
from schemas.tasks import EncodePayload
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
from worker.pipeline import model_pixels, prepare_pixels, record_failure
from worker.runtime import Runtime

if TYPE_CHECKING:
    import torch

__all__ = [
    "encode_batch",
    "start_encode",
    "finish_encode",
    "StartedEncode",
    "StartedGroup",
    "EncodeResult",
]

log = logging.getLogger(__name__)

#: the most a Milvus upsert may take (retries included) while its batch holds a ledger claim: well
#: under the 30 s other SQLite writers wait for the file's lock before they give up
CLAIMED_UPSERT_SECONDS = 10.0


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
    """The second half of :func:`encode_batch`: wait for each group's vectors, then, holding the
    batch's ledger rows (:meth:`Ledger.claim`), upsert into Milvus the items whose version is still
    their image's newest and record them in the same transaction. An older encode can therefore
    never overwrite a newer vector: an event accepted while the batch was encoded waits for the
    claim, and the items it overtook are dropped unwritten. After the claim: failed groups' items
    retried alone, pixels dropped, lag observed, one SKU refresh asked for. Never raises for a
    group's fault; raises when the ledger itself fails (the caller re-publishes the batch)."""
    m = metrics()
    ready: list[tuple[StartedGroup, np.ndarray, VersionNames]] = []
    #: each group's outcome: the items it wrote (or, with an error, retries), the items a newer
    #: event overtook (dropped unwritten), and the error that failed it
    outcomes: list[tuple[StartedGroup, list[EncodePayload], list[EncodePayload], Exception | None]] = []
    for group in started.groups:
        try:
            begun = time.perf_counter()
            vectors = group.vectors.result()
            m.stage_seconds.labels("encode").observe(group.launch_seconds + time.perf_counter() - begun)
            ready.append((group, vectors, rt.names_for(group.version)))
        except Exception as exc:  # noqa: BLE001 - the whole group failed: each item retries alone
            outcomes.append((group, group.live, [], exc))
    dirty: set[str] = set()
    if ready:
        record_gpu_memory(m)
        claim = rt.ledger.claim(p.event.image_id for group, _, _ in ready for p in group.live)
        try:
            down: Exception | None = None  # Milvus failed for a group: the next ones fail alike, unasked
            for group, vectors, names in ready:
                held = [claim.holds(p.event.image_id, p.event.version) for p in group.live]
                items = [p for p, h in zip(group.live, held) if h]
                overtaken = [p for p, h in zip(group.live, held) if not h]
                try:
                    if down is not None and items:
                        raise down
                    _upsert(rt, group.model_id, names, [(p, v) for p, v, h in zip(group.live, vectors, held, strict=True) if h])
                except Exception as exc:  # noqa: BLE001 - the whole group failed: each item retries alone
                    outcomes.append((group, items, overtaken, exc))
                    down = exc if isinstance(exc, ImgsyncError) and exc.reason in TRIPPING_REASONS else down
                    continue
                outcomes.append((group, items, overtaken, None))
            _, dirty = rt.ledger.mark_indexed(
                [
                    IndexedImage(p.event.image_id, p.event.version, p.content_hash, g.model_id, p.request_id)
                    for g, items, _, exc in outcomes
                    if exc is None
                    for p in items
                ],
                claim=claim,
            )
        finally:
            claim.release()
    settled = started.settled
    now = time.time()
    for group, items, overtaken, exc in outcomes:  # after the claim: recording a failure writes the ledger
        settled += group.settled + EncodeResult(0, len(overtaken), 0, 0)
        if exc is not None:
            rt.pixels.delete_many([p.pixel_key for p in overtaken])  # the retried items keep theirs
            settled += _group_failed(rt, dispatch, group.model_id, items, exc)
            continue
        rt.pixels.delete_many([p.pixel_key for p in group.live])
        for p in items:
            m.lag_seconds.labels(group.model_id).observe(max(0.0, now - p.event.event_time.timestamp()))
        settled += EncodeResult(len(items), 0, 0, 0)
    if dirty:
        dispatch.refresh_skus(sorted(dirty))  # one message for the batch's SKUs
    _count_encode(indexed=settled.indexed, skipped=settled.skipped, retried=settled.retried, failed=settled.failed)
    return settled


def _upsert(rt: Runtime, model_id: str, names: VersionNames, items: list[tuple[EncodePayload, np.ndarray]]) -> None:
    """Upsert a group's vectors (``items``: payload, vector) into its version's collection."""
    if not items:
        return
    m = metrics()
    m.batch_size.labels(model_id).observe(len(items))
    now_ms = int(time.time() * 1000)
    started = time.perf_counter()
    rt.store.upsert_images(
        names,
        timeout=CLAIMED_UPSERT_SECONDS,
        entities=[
            ImageEntity(
                image_id=p.event.image_id,
                sku=p.event.sku,
                uri=p.event.uri,
                vector=v,
                content_hash=p.content_hash,
                model_id=model_id,
                indexed_at=now_ms,
            )
            for p, v in items
        ],
    )
    m.stage_seconds.labels("upsert").observe(time.perf_counter() - started)


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
