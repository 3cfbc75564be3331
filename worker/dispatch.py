"""Publishing pipeline messages (JSON only) to their queues, by task name: ``worker/`` never
imports ``tasks/``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from config.settings import QueueNames
from schemas.tasks import PREPROCESS_BATCH_MAX, EncodePayload, PreprocessPayload, SkuRefreshPayload

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "Dispatcher", "GatheringDispatcher", "TASK_PREPROCESS", "TASK_PREPROCESS_BATCH", "TASK_ENCODE", "TASK_REFRESH_SKU",
    "SKU_REFRESH_DELAY", "SKU_REFRESH_CHUNK", "IMAGES_HEADER", "preprocess_chunk", "summary",
]  # fmt: skip

TASK_PREPROCESS = "imgsync.preprocess"
TASK_PREPROCESS_BATCH = "imgsync.preprocess_batch"
TASK_ENCODE = "imgsync.encode"
TASK_REFRESH_SKU = "imgsync.refresh_sku"

#: Seconds a SKU refresh waits, so that the changes of one burst coalesce into few refreshes.
SKU_REFRESH_DELAY = 0.5
#: SKUs refreshed by one message at most
SKU_REFRESH_CHUNK = 256
#: a submission is spread over at least this many preprocess messages (so every CPU worker process
#: gets some of it) before images share a message
PREPROCESS_SPREAD = 64
#: characters of a message's ``argsrepr`` summary at most
SUMMARY_CHARS = 256
#: message header: how many images a batch message carries (the encode worker's micro-batch counts them)
IMAGES_HEADER = "imgsync_images"


def preprocess_chunk(n: int, most: int) -> int:
    """Images per preprocess message for a submission of ``n``: one each up to 2 × PREPROCESS_SPREAD,
    then ``n // PREPROCESS_SPREAD``, at most ``most`` (IMGSYNC_PREPROCESS_BATCH)."""
    return max(1, min(most, n // PREPROCESS_SPREAD))


class Dispatcher:
    """Sends pipeline payloads through a configured Celery app."""

    def __init__(self, app: Celery, queues: QueueNames, preprocess_batch: int = 1) -> None:
        self.app = app
        self.queues = queues
        #: images per preprocess message at most (IMGSYNC_PREPROCESS_BATCH)
        self.preprocess_batch = preprocess_batch

    def preprocess(self, payload: PreprocessPayload, countdown: float | None = None) -> None:
        self._send(TASK_PREPROCESS, payload.model_dump(mode="json"), self.queues.preprocess, countdown)

    def preprocess_many(self, payloads: list[PreprocessPayload]) -> None:
        """Publish many payloads over one broker connection. A large submission travels as messages
        of several payloads each (:func:`preprocess_chunk`): one broker message, one pool round trip
        and one acknowledgement per chunk instead of per image."""
        if not payloads:
            return
        bodies = [p.model_dump(mode="json") for p in payloads]
        size = preprocess_chunk(len(bodies), self.preprocess_batch)
        if size == 1:
            self._send_many(TASK_PREPROCESS, bodies, self.queues.preprocess)
        else:
            self._send_items(TASK_PREPROCESS_BATCH, bodies, self.queues.preprocess, size)

    def encode(self, payload: EncodePayload, countdown: float | None = None) -> None:
        self._send(TASK_ENCODE, payload.model_dump(mode="json"), self.queues.encode, countdown)

    def encode_many(self, payloads: list[EncodePayload]) -> None:
        """Publish encode payloads as few messages (``{"items": [...]}``, up to PREPROCESS_BATCH_MAX
        each; a lone payload as a message of its own): the encode worker pays its broker receive and
        acknowledgement once per message, not per image."""
        bodies = [p.model_dump(mode="json") for p in payloads]
        if len(bodies) == 1:
            self._send(TASK_ENCODE, bodies[0], self.queues.encode, None)
        elif bodies:
            self._send_items(TASK_ENCODE, bodies, self.queues.encode, PREPROCESS_BATCH_MAX)

    def refresh_sku(self, sku: str, countdown: float | None = SKU_REFRESH_DELAY, attempt: int = 0) -> None:
        self.refresh_skus([sku], countdown, attempt)

    def refresh_skus(
        self, skus: list[str], countdown: float | None = SKU_REFRESH_DELAY, attempt: int = 0
    ) -> None:
        """Refresh many SKUs together: one message per ``SKU_REFRESH_CHUNK`` of them."""
        for i in range(0, len(skus), SKU_REFRESH_CHUNK):
            chunk = skus[i : i + SKU_REFRESH_CHUNK]
            payload = SkuRefreshPayload(skus=chunk, attempt=attempt)
            self._send(TASK_REFRESH_SKU, payload.model_dump(mode="json"), self.queues.sku, countdown)

    def _send(self, name: str, body: dict, queue: str, countdown: float | None) -> None:
        self._publish(name, body, queue, countdown=countdown or None)

    def _send_many(self, name: str, bodies: list[dict], queue: str) -> None:
        with self.app.producer_or_acquire() as producer:
            for body in bodies:
                self._publish(name, body, queue, producer=producer)

    def _send_items(self, name: str, bodies: list[dict], queue: str, size: int) -> None:
        """``bodies`` as batch messages (``{"items": [...]}``) of ``size`` each."""
        self._send_many(name, [{"items": bodies[i : i + size]} for i in range(0, len(bodies), size)], queue)

    def _publish(self, name: str, body: dict, queue: str, **options: object) -> None:
        """One message, its ``argsrepr`` header the short :func:`summary` of ``body``; a batch message
        also says how many images it carries (``IMAGES_HEADER``)."""
        if "items" in body:
            options["headers"] = {IMAGES_HEADER: len(body["items"])}
        self.app.send_task(name, args=[body], queue=queue, argsrepr=summary(body), kwargsrepr="", **options)


class GatheringDispatcher(Dispatcher):
    """The dispatcher of one batch message's items: encode payloads sent without a countdown are
    held, and :meth:`flush` publishes them together; everything else goes out at once."""

    def __init__(self, base: Dispatcher) -> None:
        super().__init__(base.app, base.queues, base.preprocess_batch)
        #: encode payloads not published yet
        self.held: list[EncodePayload] = []

    def encode(self, payload: EncodePayload, countdown: float | None = None) -> None:
        if countdown:
            super().encode(payload, countdown)
        else:
            self.held.append(payload)

    def flush(self) -> None:
        """Publish the held payloads (:meth:`Dispatcher.encode_many`); on a broker error they stay
        held and the error propagates."""
        self.encode_many(self.held)
        self.held = []


def summary(body: dict) -> str:
    """What a message is about, for the ``argsrepr`` header that monitoring shows (``celery inspect``,
    Flower): the image's URI, a batch's size and first URI, or the SKUs. Celery would otherwise build
    a ``saferepr`` of the whole payload for every message, a third of the cost of a publish."""
    if "items" in body:
        items = body["items"]
        first = summary(items[0]) if items else ""
        return f"{len(items)} images: {first}, …" if len(items) > 1 else first
    event = body.get("event")
    if isinstance(event, dict):
        return str(event.get("uri", ""))[:SUMMARY_CHARS]
    skus = list(body.get("skus") or []) + ([body["sku"]] if body.get("sku") else [])
    names = ", ".join(skus[:5]) + (f" … ({len(skus)} SKUs)" if len(skus) > 5 else "")
    return names[:SUMMARY_CHARS]
