"""Send again the work the ledger waits for but no broker message carries any more.

Every step is at-least-once, but a broker can still lose a message: kombu's Redis transport takes a
message off the list (BRPOP) before it records it as unacknowledged, so a worker SIGKILLed in between
loses that one (measured: 1 of 96 images, in 5 of 11 test kills); a Redis without its append-only
file loses what it held. The ledger still knows: the image stays ``pending`` (or ``indexed`` with a
newer event and no outcome), the SKU stays dirty.

One CPU worker node (the live node with the smallest name among those taking the preprocess queue,
from the heartbeats) looks every ``IMGSYNC_REDRIVE_INTERVAL_SECONDS``. Work idle for longer than
``Settings.effective_redrive_after`` (by then a message held unacknowledged by a dead worker was
delivered again, and any retry was due), while the queues it goes through are empty, is sent again
with its own version, crop box and request id: a replay, which converges like any duplicate. The
empty-queue condition keeps a deep backlog, whose images merely wait their turn, from being doubled;
images whose message a worker holds unacknowledged (prefetched at the tail of a backlog, in an encode
batch buffer, waiting for a retry's countdown) are not sent either (:func:`in_flight_images`).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from config.settings import Settings
from schemas.events import image_id_for
from schemas.tasks import PreprocessPayload
from worker.dispatch import Dispatcher
from worker.ledger import Ledger
from worker.metrics import metrics

__all__ = ["Redrive", "RedriveReport", "RedriveThread", "BATCH", "in_flight_images", "event_uris"]

log = logging.getLogger(__name__)

#: most images (and SKUs) sent again per look
BATCH = 5_000


@dataclass(frozen=True)
class RedriveReport:
    images: int = 0
    skus: int = 0
    #: why nothing was looked at: "" (looked), "busy" (queues not empty), "broker" (depths unknown)
    skipped: str = ""


class Redrive:
    """One look: find stalled work and send it again (see the module's docstring)."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        dispatcher: Dispatcher,
        depths: Callable[[], dict[str, int | None]] | None = None,
        held: Callable[[], set[str] | None] | None = None,
    ) -> None:
        from worker.status import queue_depths

        self.settings, self.ledger, self.dispatcher = settings, ledger, dispatcher
        self._depths = depths or (lambda: queue_depths(settings))
        self._held = held or (lambda: in_flight_images(settings))
        for kind in ("image", "sku"):  # exported at 0 from the start, so rate() and dashboards see a series
            metrics().redriven.labels(kind)

    def run_once(self, now: datetime | None = None, idle_for: float | None = None) -> RedriveReport:
        """One look at work idle for ``idle_for`` seconds (default ``Settings.effective_redrive_after``)."""
        idle_for = self.settings.effective_redrive_after if idle_for is None else idle_for
        idle_since = (now or datetime.now(UTC)) - timedelta(seconds=idle_for)
        image_rows = self.ledger.stalled_images(idle_since, BATCH)
        sku_ids = self.ledger.stalled_skus(idle_since, BATCH)
        if not image_rows and not sku_ids:
            return RedriveReport()
        try:
            depths = self._depths()
        except Exception as exc:  # noqa: BLE001 - the broker is down: nothing can be sent anyway
            log.warning("redrive: cannot read the queue depths (%s); looking again later", exc)
            return RedriveReport(skipped="broker")
        q = self.settings.queues
        if any(depths.get(name) != 0 for name in (q.preprocess, q.encode)):
            image_rows = []  # they may be waiting their turn in a backlog
        if depths.get(q.sku) != 0:
            sku_ids = []
        if image_rows:
            try:
                held = self._held()
            except Exception as exc:  # noqa: BLE001 - the broker went away meanwhile
                log.warning("redrive: cannot read the messages in flight (%s); looking again later", exc)
                return RedriveReport(skipped="broker")
            if held:
                image_rows = [r for r in image_rows if r.image_id not in held]  # in a worker's hands: not lost
        if not image_rows and not sku_ids:
            return RedriveReport(skipped="busy")
        image_ids, sku_ids = self.ledger.touch_stalled([r.image_id for r in image_rows], sku_ids, idle_since)
        chosen = set(image_ids)
        payloads = [
            PreprocessPayload(event=r.event("redrive"), request_id=r.request_id or "")
            for r in image_rows
            if r.image_id in chosen
        ]
        if payloads:
            self.dispatcher.preprocess_many(payloads)
            metrics().redriven.labels("image").inc(len(payloads))
        if sku_ids:
            self.dispatcher.refresh_skus(sku_ids, countdown=None)
        if sku_ids:
            metrics().redriven.labels("sku").inc(len(sku_ids))
        if payloads or sku_ids:
            log.warning(
                "redrive: sent again %d image(s) and %d SKU refresh(es) idle for over %.0f s with empty queues "
                "(their broker messages were lost)",
                len(payloads), len(sku_ids), idle_for,
            )  # fmt: skip
        return RedriveReport(images=len(payloads), skus=len(sku_ids))


def in_flight_images(settings: Settings) -> set[str] | None:
    """Image ids of the pipeline messages a worker holds, delivered and not acknowledged yet:
    prefetched, in an encode batch buffer, or waiting for a retry's countdown. Such an image is not
    lost even when its queue is empty and its ledger row idle (the tail of a long backlog). Read from
    the embedded broker's file or Redis' ``unacked`` hash; None for a broker that cannot tell."""
    from kombu import Connection

    with Connection(settings.effective_broker_url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1, timeout=5)
        channel = conn.default_channel
        if hasattr(channel, "held_messages"):  # worker.embedded_broker
            messages = channel.held_messages()
        elif hasattr(channel, "unacked_key") and hasattr(channel, "client"):  # kombu's Redis transport
            messages = [json.loads(v)[0] for v in channel.client.hvals(channel.unacked_key)]
        else:
            return None
    return {image_id_for(uri) for message in messages for uri in event_uris(message)}


def event_uris(message: dict) -> list[str]:
    """The image uris a Celery task message (protocol 2, JSON) carries: one for a single-image
    message, each item's for a preprocess batch, none for any other message."""
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body)[0][0]
    except Exception:  # noqa: BLE001 - not a task message of ours
        return []
    items = payload.get("items") if isinstance(payload, dict) else None
    uris = []
    for item in items if isinstance(items, list) else [payload]:
        try:
            uris.append(str(item["event"]["uri"]))
        except Exception:  # noqa: BLE001 - a SKU refresh, a malformed item
            continue
    return uris


def is_leader(ledger: Ledger, name: str, preprocess_queue: str, max_age_seconds: float) -> bool:
    """True when ``name`` is the live worker node with the smallest name among those taking the
    preprocess queue. Two nodes that briefly both think so only send duplicates, which converge."""
    names = [
        w["name"] for w in ledger.live_workers(max_age_seconds) if preprocess_queue in str(w["queues"]).split(",")
    ]
    return bool(names) and min(names) == name


#: once IMGSYNC_HOME's disk has room again after running full, work idle this long (queues empty,
#: no worker holding its message) is sent again at the next look instead of after the redrive delay:
#: the steps that could not be recorded while it was full left their images waiting
AFTER_DISK_FULL_SECONDS = 30.0
#: seconds between two looks at that disk's free space
DISK_LOOK_SECONDS = 10.0


class RedriveThread:
    """A daemon thread in a CPU worker node's main process: a look every interval, by the leader only.
    The first look after IMGSYNC_HOME's disk has room again (embedded mode) sends work idle for
    :data:`AFTER_DISK_FULL_SECONDS`."""

    def __init__(self, redrive: Redrive, node_name: str, interval: float, max_age_seconds: float) -> None:
        self.redrive, self.node_name, self.interval, self.max_age = redrive, node_name, interval, max_age_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgsync-redrive", daemon=True)

    def start(self) -> RedriveThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from worker.status import disk_problem

        ledger = self.redrive.ledger
        was_full, last_look = False, time.monotonic()
        while not self._stop.wait(min(self.interval, DISK_LOOK_SECONDS)):
            full = disk_problem(self.redrive.settings) is not None
            recovered, was_full = was_full and not full, full
            if not recovered and time.monotonic() - last_look < self.interval:
                continue
            last_look = time.monotonic()
            try:
                if is_leader(ledger, self.node_name, self.redrive.settings.queues.preprocess, self.max_age):
                    self.redrive.run_once(idle_for=AFTER_DISK_FULL_SECONDS if recovered else None)
            except Exception:  # noqa: BLE001 - a failed look is logged and tried again next interval
                log.warning("redrive: look failed", exc_info=True)
            finally:
                ledger.engine.dispose()  # no pooled connection kept between looks (a pool child may fork)
