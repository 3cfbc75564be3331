"""``imgsync sources sqs``: S3 event notifications from an SQS queue → image events.

Long-polls the queue for S3 notifications (plain, Amazon EventBridge S3 events, or either wrapped in
an SNS envelope) and turns their records into events with :mod:`worker.sources.s3events`. At least
once: a message is deleted only after its events were published; one whose events could not be
published stays in the queue and comes back after the visibility timeout. A poison message (not
JSON, not a notification) goes to the ledger's dead letters with reason ``invalid_event`` and is
then deleted, so it can never loop; an invalid record is dead-lettered on its own while the valid
records of its message are published.

The SQS client uses ``IMGSYNC_S3_ENDPOINT_URL`` and ``IMGSYNC_S3_REGION`` (moto and LocalStack serve
S3 and SQS on one endpoint); with no endpoint set, a queue URL outside AWS (ElasticMQ, LocalStack) is
its own endpoint, and with no region set, the region of an AWS queue URL is used.
SIGTERM/SIGINT stop the loop after the batch in hand (a long poll with nothing in hand is cut short).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from config.settings import Settings
from worker.cli.common import ensure_schema, err_console, handle_errors, settings_from
from worker.errors import ConfigError, ServiceUnavailable
from worker.metrics.sources import count_round, serve_source_metrics

if TYPE_CHECKING:
    from schemas.events import ImageEvent
    from worker.ledger import Ledger
    from worker.sources.s3events import Conversion, KeyRules

__all__ = ["TASK", "RoundStats", "SqsSource", "command"]

log = logging.getLogger(__name__)

#: ``task`` of this source's dead letters
TASK = "sources.sqs"
#: the ``source`` label of this source's metrics
SOURCE = "sqs"
#: messages asked for per receive call (SQS allows at most 10)
MAX_MESSAGES = 10
#: consecutive failed rounds (SQS or broker unreachable) before the loop gives up with exit 3
MAX_FAILED_ROUNDS = 10
#: pause after a failed round, doubled each time, capped by MAX_BACKOFF_SECONDS
BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
#: SQS error codes of credentials or permissions it refuses
_REFUSED_CREDENTIALS = frozenset({
    "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch", "InvalidAccessKeyId",
    "AccessDenied", "AccessDeniedException", "ExpiredToken", "ExpiredTokenException", "MissingAuthenticationToken",
})
#: pause after a short poll (IMGSYNC_SQS_WAIT_SECONDS=0) that brought nothing: no busy loop
IDLE_PAUSE_SECONDS = 1.0
#: seconds to connect to SQS; the read timeout is the long-poll wait plus this margin
CONNECT_TIMEOUT = 5.0
READ_MARGIN = 10.0

_AWS_QUEUE_HOST = re.compile(r"^sqs[.-]([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")

Publish = Callable[[Settings, "Sequence[ImageEvent]"], str]


class _Interrupted(BaseException):
    """Raised by the signal handler into a long poll that has nothing in hand yet (a BaseException,
    so that no ``except Exception`` inside botocore swallows it)."""


@dataclass
class RoundStats:
    """What one receive round did."""

    messages: int = 0
    published: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    deleted: int = 0
    kept: int = 0  # left in the queue for redelivery (publish or dead-letter failed)
    request_id: str | None = None
    failed: bool = False  # SQS, the broker or the state database failed: the loop backs off
    #: what failed when ``failed`` (the service named to the operator)
    error: ServiceUnavailable | None = None

    def add(self, other: RoundStats) -> None:
        self.messages += other.messages
        self.published += other.published
        self.skipped.update(other.skipped)
        self.dead_letters += other.dead_letters
        self.deleted += other.deleted
        self.kept += other.kept

    def line(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.messages} message(s): {self.published} event(s) published, skipped: {skipped}, "
            f"{self.dead_letters} dead-lettered, {self.deleted} deleted, {self.kept} left for redelivery"
        )


class SqsSource:
    """One queue's receive → convert → publish → delete cycle."""

    def __init__(
        self,
        settings: Settings,
        queue_url: str,
        *,
        client: Any = None,
        ledger: Ledger | None = None,
        publish: Publish | None = None,
    ) -> None:
        from worker.ledger import Ledger, make_engine
        from worker.sources.common import publish_events
        from worker.sources.s3events import KeyRules

        self.settings = settings
        self.queue_url = queue_url
        self.client = client or sqs_client(settings, queue_url)
        self.ledger = ledger or Ledger(make_engine(settings.effective_database_url))
        self.publish: Publish = publish or publish_events
        self.rules: KeyRules = KeyRules.from_settings(settings)
        #: set by SIGTERM/SIGINT: stop after the batch in hand
        self.stopping = False
        self._receiving = False

    # --- one round -------------------------------------------------------------------------------

    def check(self) -> None:
        """Fail fast when the queue cannot be reached.

        Raises:
            ServiceUnavailable: naming ``IMGSYNC_SQS_QUEUE_URL`` and the URL.
        """
        try:
            self.client.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])
        except Exception as exc:  # noqa: BLE001 - any client fault means the same to the operator
            answer = getattr(exc, "response", None) or {}
            code = str(answer.get("Error", {}).get("Code", ""))
            status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
            named = next((c for c in _REFUSED_CREDENTIALS if c in str(exc)), "")  # an answer botocore could not parse
            if code in _REFUSED_CREDENTIALS or named or status in (401, 403):  # a setting to fix, not an outage
                code = named or code or f"HTTP {status}"
                from worker.errors import ConfigError

                raise ConfigError(
                    f"SQS refused the AWS credentials for {self.queue_url} ({code}): check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the queue's policy (IMGSYNC_SQS_QUEUE_URL)"
                ) from exc
            raise self._unavailable(exc) from exc

    def receive(self, wait_seconds: int | None = None) -> list[dict[str, Any]]:
        """Up to MAX_MESSAGES messages (long poll). Returns [] when interrupted by a stop signal.

        Raises:
            ServiceUnavailable: SQS refused or could not be reached.
        """
        wait = self.settings.sqs_wait_seconds if wait_seconds is None else wait_seconds
        if self.stopping:
            return []
        try:
            self._receiving = True
            try:
                resp = self.client.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=MAX_MESSAGES,
                    WaitTimeSeconds=wait,
                    VisibilityTimeout=self.settings.sqs_visibility_timeout,
                )
            finally:
                self._receiving = False
        except _Interrupted:
            # whatever SQS handed out meanwhile reappears after the visibility timeout
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(exc) from exc
        return list(resp.get("Messages", []))

    def handle(self, messages: Sequence[dict[str, Any]]) -> RoundStats:
        """Convert, publish, dead-letter and delete one batch of messages."""
        from worker.sources.s3events import InvalidNotification, parse_notification

        stats = RoundStats(messages=len(messages))
        converted: list[tuple[dict[str, Any], Conversion]] = []
        poison: list[tuple[dict[str, Any], str]] = []
        for msg in messages:
            try:
                converted.append((msg, parse_notification(msg.get("Body", ""), self.rules, "sqs")))
            except InvalidNotification as exc:
                poison.append((msg, str(exc)))
        events = [ev for _, conv in converted for ev in conv.events]
        published = True
        if events:
            try:
                stats.request_id = self.publish(self.settings, events)
                stats.published = len(events)
            except Exception as exc:  # noqa: BLE001 - the broker's faults are many; all mean "later"
                published = False
                stats.failed, stats.error = True, self._publish_failure(exc)
                log.warning("sqs: could not publish %d event(s), their messages stay queued: %s", len(events), exc)
        done: list[dict[str, Any]] = []
        for msg, why in poison:
            if self._dead_letter(msg.get("Body", ""), f"message {msg.get('MessageId', '?')}: {why}", stats):
                stats.dead_letters += 1
                done.append(msg)
        for msg, conv in converted:
            stats.skipped.update(conv.skipped)
            if conv.events and not published:
                continue
            recorded = all(
                self._dead_letter(bad.body(), f"message {msg.get('MessageId', '?')}, record {bad.index}: {bad.error}", stats)
                for bad in conv.invalid
            )
            stats.dead_letters += len(conv.invalid) if recorded else 0
            if recorded:
                done.append(msg)
        stats.deleted = self._delete(done)
        stats.kept = stats.messages - stats.deleted
        return stats

    def round(self, wait_seconds: int | None = None) -> RoundStats:
        """One receive and the handling of what it brought."""
        messages = self.receive(wait_seconds)
        return self.handle(messages) if messages else RoundStats()

    # --- the loop --------------------------------------------------------------------------------

    def run(self, *, once: bool = False, report: Callable[[str], None] | None = None) -> RoundStats:
        """Rounds until stopped (or one round with ``once``). Returns the totals.

        Raises:
            ServiceUnavailable: MAX_FAILED_ROUNDS rounds in a row failed (or the one round, ``once``).
        """
        totals = RoundStats()
        failures, failed_at = 0, 0.0
        while not self.stopping:
            error: ServiceUnavailable | None = None
            try:
                stats = self.round()
            except ServiceUnavailable as exc:
                stats, error = RoundStats(failed=True), exc
            if stats.failed and error is None:
                error = stats.error or ServiceUnavailable(
                    "broker", "IMGSYNC_BROKER_URL", self.settings.effective_broker_url, "could not publish events"
                )
            totals.add(stats)
            if stats.messages and report:
                report(stats.line())
            hidden = time.monotonic() - failed_at < self.settings.sqs_visibility_timeout + self.settings.sqs_wait_seconds
            if error is None and not stats.messages and failures and hidden:
                # an empty receive proves nothing while the messages a failed round kept are hidden
                # (visibility timeout): the failures and the source's health stand as they were
                self._idle_pause()
                continue
            _count(stats, error)
            if error is None:
                failures = 0
                if not stats.messages:
                    self._idle_pause()
            else:
                failures, failed_at = failures + 1, time.monotonic()
                if once or failures >= MAX_FAILED_ROUNDS:
                    raise error
                log.warning("sqs: round %d failed, backing off: %s", failures, error)
                self._sleep(min(MAX_BACKOFF_SECONDS, BACKOFF_SECONDS * 2 ** (failures - 1)))
            if once:
                break
        return totals

    def interrupt(self, signum: int, frame: Any) -> None:
        """Signal handler: stop after the batch in hand; cut a long poll with nothing in hand."""
        self.stopping = True
        if self._receiving:
            raise _Interrupted

    # --- helpers ---------------------------------------------------------------------------------

    def _idle_pause(self) -> None:
        """A short poll (IMGSYNC_SQS_WAIT_SECONDS=0) that brought nothing waits a moment before the
        next: it answered at once, ~400 times a second on an empty queue."""
        if self.settings.sqs_wait_seconds < IDLE_PAUSE_SECONDS and not self.stopping:
            self._sleep(IDLE_PAUSE_SECONDS)

    def _publish_failure(self, exc: Exception) -> ServiceUnavailable:
        """The service a failed publish names: the state database (the ledger records the events
        first) or the broker."""
        import sqlalchemy as sa

        from worker.ledger.db import safe_url

        if isinstance(exc, ServiceUnavailable):
            return exc
        if isinstance(exc, sa.exc.DBAPIError):
            return ServiceUnavailable("database", "IMGSYNC_DATABASE_URL", safe_url(self.settings.effective_database_url),
                                      str(getattr(exc, "orig", exc)), state="failing")
        return ServiceUnavailable("broker", "IMGSYNC_BROKER_URL", safe_url(self.settings.effective_broker_url),
                                  f"could not publish events: {exc}")

    def _dead_letter(self, body: str, error: str, stats: RoundStats) -> bool:
        from schemas.reasons import Reason

        try:
            self.ledger.dead_letter(task=TASK, body=body, reason=str(Reason.invalid_event), error=error)
        except Exception as exc:  # noqa: BLE001 - the message stays and comes back; nothing is lost
            log.exception("sqs: could not record a dead letter; the message stays queued")
            stats.failed, stats.error = True, stats.error or self._publish_failure(exc)
            return False
        log.warning("sqs: dead-lettered: %s", error.splitlines()[0])
        return True

    def _delete(self, messages: Sequence[dict[str, Any]]) -> int:
        deleted = 0
        for start in range(0, len(messages), MAX_MESSAGES):
            chunk = messages[start : start + MAX_MESSAGES]
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)]
            try:
                resp = self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            except Exception as exc:  # noqa: BLE001 - redelivery is harmless: events are idempotent
                log.warning("sqs: could not delete %d message(s), they will be redelivered: %s", len(chunk), exc)
                continue
            for failed in resp.get("Failed", []):
                log.warning("sqs: delete failed (%s), the message will be redelivered", failed.get("Message"))
            deleted += len(resp.get("Successful", []))
        return deleted

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, deadline - time.monotonic()))

    def _unavailable(self, exc: BaseException) -> ServiceUnavailable:
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", "")
        target = self.queue_url if not endpoint or self.queue_url.startswith(endpoint) else f"{self.queue_url} via {endpoint}"
        return ServiceUnavailable("SQS", "IMGSYNC_SQS_QUEUE_URL", target, str(exc) or type(exc).__name__)


def _count(stats: RoundStats, error: ServiceUnavailable | None) -> None:
    """One round in the source metrics. A failed round counts only its dead letters: its other
    messages stay queued and are counted when they come back."""
    if error is not None:
        count_round(SOURCE, failed=True, invalid=stats.dead_letters)
    else:
        count_round(SOURCE, published=stats.published, skipped=sum(stats.skipped.values()), invalid=stats.dead_letters)


def sqs_client(settings: Settings, queue_url: str) -> Any:
    """A boto3 SQS client on ``IMGSYNC_S3_ENDPOINT_URL`` / ``IMGSYNC_S3_REGION`` (credentials from
    the boto3 chain), with timeouts that fit the long poll.

    Raises:
        ConfigError: no region anywhere (settings, queue URL, boto3's chain).
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import NoRegionError

    region = settings.s3_region or _region_of(queue_url) or None
    cfg = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=settings.sqs_wait_seconds + READ_MARGIN,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    try:
        endpoint = settings.s3_endpoint_url or _endpoint_of(queue_url) or None
        return boto3.client("sqs", endpoint_url=endpoint, region_name=region, config=cfg)
    except NoRegionError as exc:
        raise ConfigError(
            f"no AWS region for the SQS client: set IMGSYNC_S3_REGION (queue {queue_url})"
        ) from exc


def _say(line: str) -> None:
    """One progress line on stderr, verbatim (keys and URLs are not markup) and unwrapped."""
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def _endpoint_of(queue_url: str) -> str:
    """``scheme://host[:port]`` of a queue URL outside AWS (ElasticMQ, LocalStack, moto): the client
    then talks to the server that owns the queue; "" for AWS, whose endpoint boto3 knows."""
    from urllib.parse import urlparse

    if os.environ.get("AWS_ENDPOINT_URL_SQS") or os.environ.get("AWS_ENDPOINT_URL"):
        return ""  # boto3 takes the endpoint the environment names
    parsed = urlparse(queue_url)
    host = (parsed.hostname or "").lower()
    if not host or not parsed.scheme or host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return ""
    return f"{parsed.scheme}://{parsed.netloc.rpartition('@')[2]}"


def _region_of(queue_url: str) -> str:
    from urllib.parse import urlparse

    m = _AWS_QUEUE_HOST.match(urlparse(queue_url).hostname or "")
    return m.group(1) if m else ""


@handle_errors
def command(
    ctx: typer.Context,
    queue_url: Annotated[
        str | None, typer.Option("--queue-url", help="SQS queue URL (default: IMGSYNC_SQS_QUEUE_URL).")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="One receive round, then exit (tests, cron).")] = False,
) -> None:
    """Long-poll SQS for S3 event notifications and publish them as image events."""
    settings = settings_from(ctx)
    url = (queue_url or settings.sqs_queue_url).strip()
    if not url:
        raise ConfigError("no SQS queue: set IMGSYNC_SQS_QUEUE_URL or pass --queue-url")
    ensure_schema(settings)
    source = SqsSource(settings, url)
    source.check()
    if not once:  # a one-round run ends before any scrape
        serve_source_metrics(settings, SOURCE)
    previous = {sig: signal.signal(sig, source.interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    _say(f"sqs: listening on {url}" + (" (one round)" if once else ""))
    try:
        totals = source.run(once=once, report=lambda line: _say(f"sqs: {line}"))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _say(f"sqs: stopped; total {totals.line()}")
