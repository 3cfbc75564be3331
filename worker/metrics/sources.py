"""Metrics of the long-running event sources (``imgsync sources sqs|webhook|outbox|folder``), served
by the source's own process on ``IMGSYNC_METRICS_PORT``.

- ``imgsync_source_events_total{source, outcome}``: what a source made of what it received.
  ``published``: image events handed to the pipeline; ``skipped``: well-formed records that name no
  image to index (a folder marker, a key outside the prefix, an event type imgsync ignores);
  ``invalid``: messages, records or catalog rows that make no valid event, kept as dead letters
  (``imgsync failures list``).
- ``imgsync_source_failures_total{source}``: rounds (a poll, a request, an outbox batch) that failed
  because a service was away (queue, catalog, state database, broker). Nothing was acknowledged:
  the work comes back.
- ``imgsync_source_last_success_timestamp_seconds{source}``: when a round last completed, an empty
  poll included. A source that is up but stuck stops advancing it.
- ``imgsync_webhook_requests_total{code}``: the webhook's answers (200, 400, 401, 413, 503).
- ``imgsync_outbox_pending_rows`` and ``imgsync_outbox_oldest_pending_seconds``: the catalog outbox
  not relayed yet, read at scrape time (:class:`OutboxCollector`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from config.settings import Settings

__all__ = ["SourceMetrics", "source_metrics", "count_round", "declare_source", "serve_source_metrics", "OutboxCollector"]

log = logging.getLogger(__name__)

#: the ``outcome`` label's values
OUTCOMES = ("published", "skipped", "invalid")
#: the ``code`` label's values (imgsync's webhook answers nothing else)
WEBHOOK_CODES = (200, 400, 401, 413, 503)

_lock = threading.Lock()
_metrics: SourceMetrics | None = None


@dataclass(frozen=True)
class SourceMetrics:
    events: Any  #: Counter imgsync_source_events_total{source, outcome}
    failures: Any  #: Counter imgsync_source_failures_total{source}
    last_success: Any  #: Gauge imgsync_source_last_success_timestamp_seconds{source}
    webhook_requests: Any  #: Counter imgsync_webhook_requests_total{code}


def source_metrics() -> SourceMetrics:
    """The process's source metrics (built once; in multiprocess mode when the process chose it, as
    ``imgsync up`` does for its folder source)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                from prometheus_client import Counter, Gauge

                _metrics = SourceMetrics(
                    events=Counter(
                        "imgsync_source_events",
                        "What an event source made of what it received: published, skipped, invalid (dead-lettered)",
                        ["source", "outcome"],
                    ),
                    failures=Counter(
                        "imgsync_source_failures",
                        "Source rounds that failed because a service was away (the work comes back)",
                        ["source"],
                    ),
                    last_success=Gauge(
                        "imgsync_source_last_success_timestamp_seconds",
                        "Unix time a source's last round completed (an empty poll included)",
                        ["source"],
                        multiprocess_mode="max",
                    ),
                    webhook_requests=Counter("imgsync_webhook_requests", "Webhook answers by HTTP status", ["code"]),
                )
    return _metrics


def count_round(source: str, *, failed: bool = False, published: int = 0, skipped: int = 0, invalid: int = 0) -> None:
    """Count one round of ``source``: what it made of its input, and whether a service refused it
    (``failed``: the failure counter moves, the last-success time does not)."""
    m = source_metrics()
    for outcome, n in (("published", published), ("skipped", skipped), ("invalid", invalid)):
        if n:
            m.events.labels(source, outcome).inc(n)
    if failed:
        m.failures.labels(source).inc()
    else:
        m.last_success.labels(source).set(time.time())


def declare_source(source: str) -> None:
    """Create ``source``'s series at 0, so that rate() and the alert rules see 0 rather than nothing
    before its first event or failure."""
    m = source_metrics()
    for outcome in OUTCOMES:
        m.events.labels(source, outcome)
    m.failures.labels(source)
    if source == "webhook":
        for code in WEBHOOK_CODES:
            m.webhook_requests.labels(str(code))


def serve_source_metrics(settings: Settings, source: str, *, extra: list[Any] | None = None) -> None:
    """Serve ``/metrics`` for a source process on ``IMGSYNC_METRICS_PORT`` (0: none). The source's
    series exist from here on, at 0, so that the first scrape already shows them.

    Raises:
        ConfigError: the port cannot be bound (another process on this host uses it).
    """
    declare_source(source)
    if not settings.metrics_port:
        return
    from worker.metrics import start_exporter

    start_exporter(settings.metrics_port, extra=extra)
    log.info("%s source: metrics on port %d", source, settings.metrics_port)


class OutboxCollector:
    """``imgsync_outbox_pending_rows`` and ``imgsync_outbox_oldest_pending_seconds``, read from the
    catalog at scrape time; a failing read is logged, never raised into the scrape."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        import sqlalchemy as sa
        from prometheus_client.core import GaugeMetricFamily

        from worker.sources.catalog_db import outbox

        try:
            with self.engine.connect() as conn:
                pending, oldest = conn.execute(
                    sa.select(sa.func.count(), sa.func.min(outbox.c.created_at)).where(outbox.c.processed_at.is_(None))
                ).one()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the catalog hiccups
            log.warning("outbox gauges unavailable", exc_info=True)
            return
        from datetime import UTC, datetime

        age = 0.0
        if oldest is not None:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)  # SQLite: naive UTC
            age = max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        yield GaugeMetricFamily("imgsync_outbox_pending_rows", "Catalog outbox rows not relayed yet", value=int(pending))
        yield GaugeMetricFamily(
            "imgsync_outbox_oldest_pending_seconds", "Age of the oldest catalog outbox row not relayed yet (0: none)", value=age
        )
