"""Instrumentation shared by every task: payload validation, typed-error handling (retry or give up),
timing. Task bodies stay one line."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from pydantic import ValidationError

from schemas.reasons import Reason
from schemas.tasks import PreprocessPayload, SkuRefreshPayload
from worker import celery_app, pipeline
from worker.errors import ImgsyncError, PermanentError, TransientError
from worker.metrics import metrics

__all__ = ["ImageTask", "SkuTask"]

log = logging.getLogger(__name__)


class ImageTask(Task):
    """Base of single-image tasks: a typed error never escapes as a task failure."""

    abstract = True
    #: the payload model the single positional argument is validated against
    payload_model: type[PreprocessPayload] = PreprocessPayload
    #: the ``stage`` label of this task's metrics
    stage = "preprocess"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or kwargs:
            log.error("%s: malformed call (args=%r kwargs=%r): dropped", self.name, args, kwargs)
            return "invalid"
        try:
            payload = self.payload_model.model_validate(args[0])
        except ValidationError as exc:
            log.error("%s: invalid payload dropped: %s", self.name, exc)
            return "invalid"
        try:
            outcome = self.run(payload)
        except ImgsyncError as exc:
            if not isinstance(exc, (PermanentError, TransientError)):
                exc = TransientError(Reason.internal_error, str(exc))
            outcome = pipeline.record_failure(celery_app.runtime(), celery_app.dispatcher(), payload, exc)
        except Exception as exc:  # noqa: BLE001 - an unexpected fault (DB hiccup, bug): retry, never lose
            log.exception("%s: unexpected error on %s", self.name, payload.event.uri)
            err = TransientError(Reason.internal_error, f"{type(exc).__name__}: {exc}")
            outcome = pipeline.record_failure(celery_app.runtime(), celery_app.dispatcher(), payload, err)
        metrics().images.labels(self.stage, outcome).inc()
        return outcome


class SkuTask(Task):
    """Base of SKU refresh: a transient error is retried with backoff, up to the retry limit."""

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            payload = SkuRefreshPayload.model_validate(args[0] if args else kwargs)
        except (ValidationError, IndexError) as exc:
            log.error("%s: invalid payload dropped: %s", self.name, exc)
            return "invalid"
        try:
            return self.run(payload)
        except ImgsyncError as exc:
            settings = celery_app.settings()
            if payload.attempt >= settings.max_retries:
                log.error("sku %s: refresh gave up after %d attempts: %s", payload.sku, payload.attempt + 1, exc)
                return "failed"
            celery_app.dispatcher().refresh_sku(
                payload.sku, countdown=pipeline.backoff_seconds(payload.attempt), attempt=payload.attempt + 1
            )
            return "retried"

