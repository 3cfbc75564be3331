"""Instrumentation shared by every task: payload validation, typed-error handling (retry or give up),
timing. Task bodies stay one line."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from time import monotonic
from typing import Any

from celery import Task
from celery.concurrency.solo import TaskPool as SoloPool
from celery_batches import Batches, SimpleRequest, consume_queue
from celery_batches.trace import apply_batches_task
from pydantic import ValidationError

from schemas.events import URI_NORMALIZED
from schemas.reasons import Reason
from schemas.tasks import EncodeBatchPayload, EncodePayload, PreprocessBatchPayload, PreprocessPayload, SkuRefreshPayload
from worker import celery_app, pipeline
from worker.dispatch import IMAGES_HEADER, TASK_ENCODE, GatheringDispatcher
from worker.errors import ImgsyncError, PermanentError, TransientError
from worker.index.milvus_store import CollectionMissing
from worker.metrics import metrics

__all__ = ["ImageTask", "ImageBatchTask", "ImageBatches", "SkuTask", "dead_letter", "encode_payloads", "images_in"]

log = logging.getLogger(__name__)

#: the micro-batch timer's period: a quarter of IMGSYNC_BATCH_WAIT_MS, 50 ms at most. A part-filled
#: batch waits IMGSYNC_BATCH_WAIT_MS and at most a tick more; written batches are acknowledged (and
#: held ones written) once the worker has been quiet for a tick.
TICKS_PER_WAIT = 4
TICK_MAX_SECONDS = 0.05


def dead_letter(task: str, body: Any, error: str) -> str:
    """A message that can never be processed (malformed payload): kept in the ledger's dead letters
    with reason ``invalid_event`` and counted; the worker goes on. Returns ``invalid``."""
    log.error("%s: malformed message dead-lettered: %s", task, error.splitlines()[0] if error else "")
    metrics().dead_letters.labels(task).inc()
    try:
        text = json.dumps(body, default=repr)
    except (TypeError, ValueError):
        text = repr(body)
    try:
        celery_app.runtime().ledger.dead_letter(task, text, str(Reason.invalid_event), error)
    except Exception:  # noqa: BLE001 - the state store being down must not crash the worker
        log.exception("%s: could not record the dead letter", task)
    return "invalid"


#: encode payloads are made by the preprocess stage from events whose uris it normalized
_BETWEEN_STAGES = {URI_NORMALIZED: True}


def encode_payloads(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> list[EncodePayload]:
    """The valid encode payloads of one message (one, or a batch's items); a malformed message or
    item is dead-lettered on its own."""
    body = args[0] if len(args) == 1 and not kwargs else None
    raw = [body]
    if isinstance(body, dict) and "items" in body:
        try:
            raw = list(EncodeBatchPayload.model_validate(body).items)
        except ValidationError as exc:
            dead_letter(TASK_ENCODE, body, str(exc))
            return []
    out: list[EncodePayload] = []
    for item in raw:
        try:
            out.append(EncodePayload.model_validate(item, context=_BETWEEN_STAGES))
        except ValidationError as exc:
            shown = item if len(raw) > 1 else {"args": list(args), "kwargs": kwargs}
            dead_letter(TASK_ENCODE, shown, str(exc))
    return out


class ImageTask(Task):
    """Base of single-image tasks: a typed error never escapes as a task failure."""

    abstract = True
    #: the payload model the single positional argument is validated against
    payload_model: type[PreprocessPayload] = PreprocessPayload
    #: the ``stage`` label of this task's metrics
    stage = "preprocess"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or kwargs:
            return dead_letter(self.name, {"args": args, "kwargs": kwargs}, "expected one payload argument")
        return self.handle(args[0])

    def handle(self, body: Any) -> str:
        """Validate one payload, run it, record a typed error (retry or give up); the outcome."""
        payload = self.validate(body)
        return payload if isinstance(payload, str) else self.process(payload)

    def validate(self, body: Any) -> PreprocessPayload | str:
        """The payload, or the outcome of setting a malformed one aside (``invalid``)."""
        try:
            return self.payload_model.model_validate(body)
        except ValidationError as exc:
            return dead_letter(self.name, body, str(exc))

    def process(self, payload: PreprocessPayload, *context: Any, count: bool = True) -> str:
        """Run a valid payload (``context``: more arguments of the task body); a typed error is
        recorded (retry or give up), an unexpected one retried. The outcome, counted in the
        metrics unless ``count`` is false (the caller counts it)."""
        try:
            outcome = self.run(payload, *context)
        except ImgsyncError as exc:
            if not isinstance(exc, (PermanentError, TransientError)):
                exc = TransientError(Reason.internal_error, str(exc))
            outcome = pipeline.record_failure(celery_app.runtime(), celery_app.dispatcher(), payload, exc)
        except Exception as exc:  # noqa: BLE001 - an unexpected fault (DB hiccup, bug): retry, never lose
            log.exception("%s: unexpected error on %s", self.name, payload.event.uri)
            err = TransientError(Reason.internal_error, f"{type(exc).__name__}: {exc}")
            outcome = pipeline.record_failure(celery_app.runtime(), celery_app.dispatcher(), payload, err)
        if count:
            metrics().images.labels(self.stage, outcome).inc()
        return outcome


class ImageBatchTask(ImageTask):
    """Base of tasks whose message carries several single-image payloads (a large submission): each
    item runs exactly as :class:`ImageTask` runs a message of its own, so one bad or failing item
    is recorded alone and its batch mates go on. The ledger rows of the batch's images are read
    ahead in one transaction (:func:`worker.pipeline.read_ahead`), and the items' encode payloads
    leave as one message at the end (:class:`worker.dispatch.GatheringDispatcher`); the task body
    gets an item's ledger entry and that dispatcher as its second and third arguments. Returns the
    outcomes counted, e.g. ``queued=15,unchanged=1``."""

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or kwargs:
            return dead_letter(self.name, {"args": args, "kwargs": kwargs}, "expected one payload argument")
        try:
            batch = PreprocessBatchPayload.model_validate(args[0])
        except ValidationError as exc:
            return dead_letter(self.name, args[0], str(exc))
        payloads = [self.validate(item) for item in batch.items]
        known = self.read_ahead([p for p in payloads if not isinstance(p, str)])
        out = GatheringDispatcher(celery_app.dispatcher())
        outcomes = Counter(
            p if isinstance(p, str) else self.process(p, known.get(p.event.image_id), out, count=False)
            for p in payloads
        )
        if out.held:
            self.publish_encodes(out, outcomes)
        outcomes = +outcomes  # without the zero counts
        for outcome, n in outcomes.items():
            if outcome != "invalid":
                metrics().images.labels(self.stage, outcome).inc(n)
        return ",".join(f"{k}={v}" for k, v in sorted(outcomes.items()))

    def publish_encodes(self, out: GatheringDispatcher, outcomes: Counter[str]) -> None:
        """Send the batch's encode payloads as one message. If the broker refuses it, each image's
        encode is retried on its own with backoff (its pixels are stored already); if even that
        cannot be sent, the image stays pending in the ledger and the redrive sends it again."""
        try:
            out.flush()
            return
        except Exception as exc:  # noqa: BLE001 - the broker down must not lose the batch's images
            log.warning("%s: publishing %d encode payloads failed: retrying each", self.name, len(out.held), exc_info=True)
            err = TransientError(Reason.internal_error, f"publishing the encode message failed: {type(exc).__name__}: {exc}")
        rt, dispatch = celery_app.runtime(), celery_app.dispatcher()
        per_image: dict[str, str] = {}  # an image encoded for two model versions has two payloads
        for payload in out.held:
            try:
                outcome = pipeline.record_failure(rt, dispatch, payload, err, keep_pixels=True)
            except Exception:  # noqa: BLE001 - broker and/or ledger down: the redrive finds the pending image
                log.exception("%s: could not retry %s: left to the redrive", self.name, payload.event.uri)
                outcome = "retried"
            if per_image.get(payload.event.image_id) != "failed":
                per_image[payload.event.image_id] = outcome
        for outcome in per_image.values():
            outcomes["queued"] -= 1
            outcomes[outcome] += 1
        out.held = []

    def read_ahead(self, payloads: list[PreprocessPayload]) -> dict[str, Any]:
        """The batch's ledger rows, or nothing when the ledger cannot answer: each item then reads
        for itself, and fails (and is retried) on its own."""
        try:
            return pipeline.read_ahead(celery_app.runtime(), payloads)
        except Exception:  # noqa: BLE001 - the state store down must not fail the whole message
            log.warning("%s: could not read the ledger ahead for %d images", self.name, len(payloads), exc_info=True)
            return {}


class ImageBatches(Batches):
    """celery-batches counting images, not messages: a batch message (header ``IMAGES_HEADER``)
    counts for every image it carries. When ``flush_images`` images wait, whole messages are run
    in groups of at most ``flush_images`` images, and the messages that do not fill a group wait
    for the next one (or for ``flush_interval``, which runs everything waiting). A message of
    more images than that is run alone (the task body splits it).

    Write-behind (:meth:`can_hold`): a task body may return ``{"held_flushes": k, ...}`` to say
    that images of its latest ``k`` flushes (this one included) are still being written (by the
    encode worker's writer thread). Those flushes' messages are acknowledged by a later flush once
    the body reports them written; once the worker has been quiet for a tick, the timer runs an
    empty flush (``run([])``), whose body waits for every write. A worker stopped meanwhile
    acknowledged none of them: the broker delivers them again."""

    abstract = True
    #: images per micro-batch (IMGSYNC_BATCH_MAX)
    flush_images = 32
    #: celery-batches' own count of messages: never reached, images are counted instead
    flush_every = 2**31
    #: write-behind mode (IMGSYNC_ENCODE_OVERLAP): "auto", "on" or "off"
    overlap = "off"
    #: images buffered since the last flush
    _images = 0
    #: the requests of the latest flushes whose writes are still under way, oldest first
    _held: list[list[Any]]
    #: the consumer's process, when its pool is the solo pool (task bodies run in it)
    _solo_pid: int | None = None
    #: when the oldest message waiting for a flush came (monotonic), and the last message or flush
    _waiting_since: float | None = None
    _last_activity = 0.0

    def __init__(self) -> None:
        super().__init__()
        self._held = []

    def Strategy(self, task: Batches, app: Any, consumer: Any) -> Any:  # noqa: N802 - celery's name
        handler = super().Strategy(task, app, consumer)
        self._held = []
        self._solo_pid = os.getpid() if isinstance(consumer.pool, SoloPool) else None
        timer = consumer.timer

        def on_message(message: Any, *args: Any, **kwargs: Any) -> None:
            now = monotonic()
            self._last_activity = now
            if self._waiting_since is None:
                self._waiting_since = now
            if self._tref is None:  # our timer, not celery-batches' (which would flush every interval)
                self._tref = timer.call_repeatedly(self.tick, self._do_flush)
            handler(message, *args, **kwargs)
            self._images += images_in(message.headers)
            if self._images >= self.flush_images:
                self._flush_full()

        return on_message

    @property
    def tick(self) -> float:
        """The timer's period, seconds."""
        return min(self.flush_interval / TICKS_PER_WAIT, TICK_MAX_SECONDS)

    def can_hold(self) -> bool:
        """May the task body keep writes for the next flush? Only where it runs in the consumer's
        own process and thread (the solo pool): the next flush then runs in the same process, and
        the acknowledgements follow the writes."""
        return self.overlap != "off" and self._solo_pid is not None and self._solo_pid == os.getpid()

    def flush(self, requests: Any) -> Any:
        """Run ``requests``; acknowledge them when the body returns, unless it says the writes of its
        latest ``held_flushes`` flushes (this one included) are still under way: those flushes'
        messages are acknowledged by a later flush, once written. Older held ones are acknowledged."""
        if not self._held and not self.can_hold():
            return super().flush(requests)

        def on_return(result: Any) -> None:
            self._last_activity = monotonic()  # what the tick measures quiet from
            self._held.append(list(requests))
            keep = int(result.get("held_flushes", 0)) if isinstance(result, dict) else 0
            while len(self._held) > keep:
                for req in self._held.pop(0):
                    req.acknowledge()

        return self._pool.apply_async(
            apply_batches_task, (self, ([SimpleRequest.from_request(r) for r in requests],), 0, None), callback=on_return
        )

    def _do_flush(self) -> None:
        """The timer (every :attr:`tick`): run what waits once the oldest waiting message has
        waited ``flush_interval``, not before (celery-batches' own timer flushes whatever waits at
        each tick, cutting a stream into part-filled batches). What is held is written, and its
        messages acknowledged, once the worker has been quiet for a tick (no message, no flush):
        right after a flush the tick comes before the next messages are read, and waiting for the
        writer then would leave the device idle."""
        now = monotonic()
        quiet = now - self._last_activity >= self.tick
        held = any(self._held)
        if self._buffer.qsize():
            if now - (self._waiting_since if self._waiting_since is not None else now) >= self.flush_interval:
                self._flush_all()
            elif held and quiet:
                self.flush([])  # a trickle: write what is held while the part-filled batch waits
            return
        if held and not quiet:
            return
        self._flush_all()  # retries now due; what is held; the timer stops once nothing is left

    def _flush_all(self) -> None:
        """Run everything waiting (celery-batches' flush: retries whose countdown is not over stay
        pending), then write what is held if nothing new came."""
        self._images = 0
        self._waiting_since = None
        idle = self._buffer.qsize() == 0  # no new message since the last flush (retries' countdowns aside)
        super()._do_flush()
        if idle and any(self._held):
            self.flush([])  # nothing more came: write what is held

    def _flush_full(self) -> None:
        waiting = list(consume_queue(self._buffer))
        if any(req.eta for req in waiting):  # a retry's countdown: celery-batches sorts those out
            for req in waiting:
                self._buffer.put(req)
            self._flush_all()
            return
        groups: list[list[Any]] = []
        group: list[Any] = []
        n = 0
        for req in waiting:
            k = images_in(getattr(req, "request_dict", None))
            if group and n + k > self.flush_images:
                groups.append(group)
                group, n = [], 0
            group.append(req)
            n += k
        if n >= self.flush_images:
            groups.append(group)
            group, n = [], 0
        for req in group:  # not a full group: waits for more, or for the timer
            self._buffer.put(req)
        self._images = n
        if not n:
            self._waiting_since = None  # else the rest keeps the oldest arrival (it may be older)
        for g in groups:
            self.flush(g)


def images_in(headers: Any) -> int:
    """How many images a message carries, from its ``IMAGES_HEADER`` (1 without one)."""
    try:
        return max(1, int((headers or {}).get(IMAGES_HEADER, 1)))
    except (TypeError, ValueError, AttributeError):
        return 1


class SkuTask(Task):
    """Base of SKU refresh: a transient error is retried with backoff, up to the retry limit."""

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            payload = SkuRefreshPayload.model_validate(args[0] if args else kwargs)
        except (ValidationError, IndexError) as exc:
            return dead_letter(self.name, {"args": args, "kwargs": kwargs}, str(exc))
        try:
            return self.run(payload)
        except ImgsyncError as exc:
            settings = celery_app.settings()
            if isinstance(exc, CollectionMissing):  # made again on the next attempt
                celery_app.runtime().forget_collections()
            if payload.attempt >= settings.max_retries:
                names = ", ".join(payload.all_skus[:5]) + (" …" if len(payload.all_skus) > 5 else "")
                # the SKUs stay dirty in the ledger: the redrive sends them again once things settle
                log.error("sku %s: refresh gave up after %d attempts: %s", names, payload.attempt + 1, exc)
                return "failed"
            celery_app.dispatcher().refresh_skus(
                payload.all_skus, countdown=pipeline.backoff_seconds(payload.attempt, settings.retry_backoff_max), attempt=payload.attempt + 1
            )
            return "retried"

