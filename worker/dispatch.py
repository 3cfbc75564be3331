"""Publishing pipeline messages (JSON only) to their queues, by task name: ``worker/`` never
imports ``tasks/``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from config.settings import QueueNames
from schemas.tasks import EncodePayload, PreprocessPayload, SkuRefreshPayload

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Dispatcher", "TASK_PREPROCESS", "TASK_ENCODE", "TASK_REFRESH_SKU", "SKU_REFRESH_DELAY", "SKU_REFRESH_CHUNK"]

TASK_PREPROCESS = "imgsync.preprocess"
TASK_ENCODE = "imgsync.encode"
TASK_REFRESH_SKU = "imgsync.refresh_sku"

#: Seconds a SKU refresh waits, so that the changes of one burst coalesce into few refreshes.
SKU_REFRESH_DELAY = 0.5
#: SKUs refreshed by one message at most
SKU_REFRESH_CHUNK = 256


class Dispatcher:
    """Sends pipeline payloads through a configured Celery app."""

    def __init__(self, app: Celery, queues: QueueNames) -> None:
        self.app = app
        self.queues = queues

    def preprocess(self, payload: PreprocessPayload, countdown: float | None = None) -> None:
        self._send(TASK_PREPROCESS, payload.model_dump(mode="json"), self.queues.preprocess, countdown)

    def preprocess_many(self, payloads: list[PreprocessPayload]) -> None:
        """Publish many payloads over one broker connection."""
        if not payloads:
            return
        with self.app.producer_or_acquire() as producer:
            for p in payloads:
                self.app.send_task(
                    TASK_PREPROCESS,
                    args=[p.model_dump(mode="json")],
                    queue=self.queues.preprocess,
                    producer=producer,
                )

    def encode(self, payload: EncodePayload, countdown: float | None = None) -> None:
        self._send(TASK_ENCODE, payload.model_dump(mode="json"), self.queues.encode, countdown)

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
        self.app.send_task(name, args=[body], queue=queue, countdown=countdown or None)
