"""``imgsync sources outbox``: relay catalog changes, written to ``catalog_outbox`` by the catalog's
triggers (``migrations/catalog/``), as :class:`~schemas.events.ImageEvent` objects.

A batch: claim up to ``IMGSYNC_OUTBOX_BATCH`` unprocessed rows, tick the catalog clock, read the
*current* catalog state of every uri the rows touch, publish one event per uri, then mark the rows
processed. PostgreSQL does it in one transaction (``FOR UPDATE SKIP LOCKED``, so relays share the
work). SQLite cannot hold its write lock while publishing (publishing writes the ledger, the same
file in the embedded default): it reads in one short transaction and marks in another, and relays
of one catalog take turns on an advisory lock file (``<catalog file>.relay.lock``). Rows are claimed by
``processed_at IS NULL``, never by "id above the last one seen", so a transaction that commits late
is relayed like any other. A crash between publish and commit publishes again (at least once).

An event states what the catalog holds for its uri: upsert under the SKU (and crop box) of its live
image row, or delete when no live row is left (image or product deleted, soft or hard, or the uri
changed). A SKU change therefore republishes the product's images under the new SKU.

Versions order *reads*, not writes. The event version is the catalog clock (``catalog_clock``:
nanoseconds since the epoch, ``max(last + 1, now)``), ticked in a transaction of its own after the
rows are claimed and before the state is read. A relay that reads after a change committed ticks
after that commit, so the highest version of a uri always carries a state that includes its latest
change: the newest wins under late commits and any number of relays. Outbox ids or ``updated_at``
would order writes instead: a late commit carries an older id than changes relayed before it, and
a SKU change (product row) races an image change (image row) with no lock in common. Being
nanoseconds on the wall clock, catalog versions compare sensibly with those ``imgsync index`` and
``reindex`` give (``time.time_ns()``), so a re-index never makes later catalog changes look stale.

PostgreSQL relays wake on ``LISTEN imgsync_catalog_outbox`` and poll every
``IMGSYNC_OUTBOX_POLL_SECONDS`` as a fallback; SQLite relays poll.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, NamedTuple
from urllib.parse import urlparse

import sqlalchemy as sa
import typer
from pydantic import ValidationError
from sqlalchemy.engine import Connection, Row

from config.settings import Settings
from schemas.events import Action, CropBox, ImageEvent, escape_bytes, normalize_uri
from worker.cli.common import err_console, handle_errors, settings_from
from worker.ledger.db import safe_url
from worker.metrics.sources import OutboxCollector, count_round, serve_source_metrics
from worker.sources.catalog_db import (
    NOTIFY_CHANNEL,
    SETTING,
    catalog_clock,
    catalog_engine,
    outbox,
    product_images,
    products,
    same_database,
    upgrade_catalog,
)

__all__ = ["OutboxRelay", "RelayStats", "command"]

log = logging.getLogger(__name__)

#: ``task`` of the dead letters this source records
DEAD_LETTER_TASK = "sources.outbox"
SOURCE = "outbox"


class _Batch(NamedTuple):
    """One batch read: its outbox rows, the clock tick, the events and the dead letters."""

    rows: Sequence[Row]
    version: int
    events: list[ImageEvent]
    bad: list[tuple[dict, str]]


@dataclass
class RelayStats:
    """What a relay did: outbox rows processed, events published, rows dead-lettered."""

    rows: int = 0
    upserts: int = 0
    deletes: int = 0
    dead_letters: int = 0
    batches: int = 0

    def add(self, other: RelayStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class OutboxRelay:
    """Relays ``catalog_outbox`` rows of the catalog at ``IMGSYNC_CATALOG_URL`` to the pipeline.

    Several relays may run against one catalog. ``publish`` is
    :func:`worker.sources.common.publish_events` unless a test hands in its own.
    """

    #: longest pause between retries while the catalog, the state DB or the broker is away, seconds
    MAX_BACKOFF = 30.0
    #: processed outbox rows older than this are deleted
    RETENTION = timedelta(days=7)
    #: seconds between two purges of processed rows
    PURGE_EVERY = 3600.0
    #: uris or product ids per ``IN (...)`` query
    CHUNK = 500
    #: longest single wait for a notification, so that a stop request is seen quickly, seconds
    WAIT_SLICE = 0.5

    def __init__(
        self,
        settings: Settings,
        *,
        publish: Callable[[Settings, Sequence[ImageEvent]], str] | None = None,
    ) -> None:
        from worker.sources.common import publish_events  # celery: loaded when used

        self.settings = settings
        self.url = settings.effective_catalog_url
        self.engine = catalog_engine(self.url)
        self.postgres = self.engine.dialect.name == "postgresql"
        if not self.postgres:
            # SQLite keeps any bytes as TEXT, and sqlite3 raises on text that is not UTF-8: one such
            # uri or SKU made every read of its batch fail, so the relay stalled. Read it with its
            # bad bytes as surrogates instead; the image becomes a dead letter (_undecodable).
            sa.event.listen(self.engine, "connect", _lenient_text)
        self.batch = settings.outbox_batch
        self._publish = publish or publish_events
        # same database: dead letters join the relay's transaction (SQLite: a second connection
        # would wait for the relay's own write lock)
        self._dead_letters_inline = same_database(self.url, settings.effective_database_url)
        self._ledger = None
        self._last_purge = 0.0

    # --- one batch -------------------------------------------------------------------------------

    def relay_batch(self) -> RelayStats:
        """Claim, publish and mark one batch of outbox rows; returns what it did (rows 0: none left).

        PostgreSQL: the rows stay locked (``FOR UPDATE SKIP LOCKED``) while they are published, so a
        second relay takes other rows. SQLite: a write transaction holds the whole file, and
        publishing writes the ledger, which in the embedded default is that same file; so the
        clock is ticked and the catalog read in one short transaction, the events published outside
        it, and the rows marked processed in a second one (the catalog's own writers never wait
        for a publish either). A crash between publishing and marking relays the rows again: the
        events are idempotent.

        Raises whatever the catalog, the state database or the broker raises; then nothing is
        marked processed and the rows are relayed again later.
        """
        claim = sa.select(outbox).where(outbox.c.processed_at.is_(None)).order_by(outbox.c.id).limit(self.batch)
        if self.postgres:
            # read committed whatever the server's default: the state read must see every change
            # committed before the tick (a repeatable-read snapshot from the claim would not)
            with self.engine.connect().execution_options(isolation_level="READ COMMITTED") as conn, conn.begin():
                batch = self._read(conn, claim.with_for_update(skip_locked=True))
                if batch is None:
                    return RelayStats()
                self._publish_batch(batch)
                self._mark(conn, batch)
        else:
            with self._sqlite_relay_lock():  # one relay at a time per catalog file, as the rows' lock does on PostgreSQL
                with self.engine.begin() as conn:
                    batch = self._read(conn, claim)
                if batch is None:
                    return RelayStats()
                self._publish_batch(batch)
                with self.engine.begin() as conn:
                    self._mark(conn, batch)
        rows, version, events, bad = batch
        stats = RelayStats(rows=len(rows), batches=1, dead_letters=len(bad))
        stats.upserts = sum(1 for e in events if e.action == "upsert")
        stats.deletes = len(events) - stats.upserts
        log.info("outbox: %d row(s) → %d upsert(s), %d delete(s), %d dead letter(s), version %d",
                 stats.rows, stats.upserts, stats.deletes, stats.dead_letters, version)
        return stats

    @contextlib.contextmanager
    def _sqlite_relay_lock(self) -> Iterator[None]:
        """An advisory lock on ``<catalog file>.relay.lock`` for one batch: relays of one SQLite
        catalog take turns (each row is published by one of them) without holding the database's
        write lock while they publish. The kernel drops it however its holder ends."""
        path = sa.engine.make_url(self.url).database
        if not path or path == ":memory:":
            yield
            return
        with open(f"{path}.relay.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self, conn: Connection, claim: sa.Select) -> _Batch | None:
        """Claim rows, tick the clock and read the state they touch; None when no row waits."""
        rows = conn.execute(claim).all()
        if not rows:
            return None
        version = self._tick(conn)
        events, bad = self._events(conn, rows, version)
        return _Batch(rows, version, events, bad)

    def _publish_batch(self, batch: _Batch) -> None:
        if batch.events:
            self._publish(self.settings, batch.events)

    def _mark(self, conn: Connection, batch: _Batch) -> None:
        """Record the batch's dead letters and mark its rows processed (rows another relay marked
        meanwhile stay as they are)."""
        rows, bad = batch.rows, batch.bad
        for body, error in bad:
            self._dead_letter(conn, body, error)
        conn.execute(
            outbox.update()
            .where(outbox.c.id.in_([r.id for r in rows]), outbox.c.processed_at.is_(None))
            .values(processed_at=datetime.now(UTC))
        )

    def drain(self, stop: threading.Event | None = None) -> RelayStats:
        """Relay batches until no unclaimed row is left (or ``stop`` is set between batches)."""
        total = RelayStats()
        while stop is None or not stop.is_set():
            stats = self.relay_batch()
            count_round(SOURCE, published=stats.upserts + stats.deletes, invalid=stats.dead_letters)
            total.add(stats)
            if stats.rows == 0:
                break
        return total

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set (checked between batches): wake on NOTIFY (PostgreSQL) or
        every ``IMGSYNC_OUTBOX_POLL_SECONDS``; retry with backoff while a service is away."""
        listener = _Listener(self.url) if self.postgres else None
        backoff = 0.0
        try:
            if listener is not None:
                listener.open()  # before the first drain: nothing committed meanwhile is missed
            while not stop.is_set():
                try:
                    self.drain(stop)
                    self._purge_if_due()
                    backoff = 0.0
                except Exception as exc:  # noqa: BLE001 - a service is away: retry, never die
                    count_round(SOURCE, failed=True)
                    backoff = min(max(backoff * 2, 1.0), self.MAX_BACKOFF)
                    log.warning("outbox relay: %s; retrying in %.0f s", exc, backoff, exc_info=log.isEnabledFor(logging.DEBUG))
                    stop.wait(backoff)
                    continue
                if listener is not None:
                    listener.wait(self.settings.outbox_poll_seconds, stop, self.WAIT_SLICE)
                else:
                    stop.wait(self.settings.outbox_poll_seconds)
        finally:
            if listener is not None:
                listener.close()

    def close(self) -> None:
        self.engine.dispose()
        if self._ledger is not None:
            self._ledger.engine.dispose()

    # --- helpers ---------------------------------------------------------------------------------

    def _tick(self, conn: Connection) -> int:
        """Advance the catalog clock and return it. PostgreSQL: in its own committed transaction,
        so that the state read next sees every change committed before the tick."""
        clock = catalog_clock
        now = sa.literal(time.time_ns(), sa.BigInteger())
        stmt = (
            clock.update()
            .where(clock.c.id == 1)
            .values(ns=sa.case((clock.c.ns + 1 > now, clock.c.ns + 1), else_=now))
            .returning(clock.c.ns)
        )
        if self.postgres:
            with self.engine.begin() as tick_conn:
                ns = tick_conn.execute(stmt).scalar_one_or_none()
                if ns is None:
                    ns = time.time_ns()
                    tick_conn.execute(clock.insert().values(id=1, ns=ns))
        else:
            ns = conn.execute(stmt).scalar_one_or_none()
            if ns is None:
                ns = time.time_ns()
                conn.execute(clock.insert().values(id=1, ns=ns))
        return int(ns)

    def _events(
        self, conn: Connection, rows: Sequence[Row], version: int
    ) -> tuple[list[ImageEvent], list[tuple[dict, str]]]:
        """One event per uri the rows touch, from the catalog's current state; and the dead letters
        ``(body, error)`` of the uris that make no valid event."""
        pi = product_images
        touched: dict[str, list[int]] = {}  # raw catalog uri -> outbox ids
        when: dict[int, datetime] = {r.id: _aware(r.created_at) for r in rows}
        hint_sku: dict[str, str] = {}  # the SKU a trigger saw, for deletes of rows now gone
        by_product: dict[int, list[int]] = {}
        bad: list[tuple[dict, str]] = []
        for r in rows:
            if r.entity == "image":
                for uri in (r.old_uri, r.new_uri):
                    if uri:
                        touched.setdefault(uri, []).append(r.id)
                        if r.sku:
                            hint_sku.setdefault(uri, r.sku)
            elif r.entity == "product" and r.product_id is not None:
                by_product.setdefault(r.product_id, []).append(r.id)
            else:
                bad.append(({"outbox_id": r.id, "entity": r.entity, "op": r.op}, f"unknown outbox entity {r.entity!r}"))
        for chunk in _chunks(list(by_product), self.CHUNK):
            for uri, pid in conn.execute(sa.select(pi.c.uri, pi.c.product_id).where(pi.c.product_id.in_(chunk))):
                touched.setdefault(uri, []).extend(by_product[pid])
        state: dict[str, list[Row]] = {}
        # deleted_at read as a flag and updated_at as text: a store writing SQLite timestamps in another
        # form (epoch seconds, "") must not make every read of the batch fail (the relay stalled)
        query = sa.select(
            pi.c.id, pi.c.uri, pi.c.deleted_at.is_not(None).label("deleted"),
            sa.type_coerce(pi.c.updated_at, sa.String()).label("updated_at") if not self.postgres else pi.c.updated_at,
            pi.c.crop_x, pi.c.crop_y, pi.c.crop_w, pi.c.crop_h,
            products.c.sku, products.c.deleted_at.is_not(None).label("product_deleted"),
        ).select_from(pi.outerjoin(products, products.c.id == pi.c.product_id))
        readable = [u for u in touched if not _undecodable(u)]  # a parameter must be UTF-8 to be sent
        for chunk in _chunks(readable, self.CHUNK):
            for s in conn.execute(query.where(pi.c.uri.in_(chunk))):
                state.setdefault(s.uri, []).append(s)
        events: dict[str, ImageEvent] = {}
        for uri, ids in touched.items():
            event, error, body = _event_for(uri, state.get(uri, []), hint_sku.get(uri), version, min(when[i] for i in ids))
            if event is not None:
                prev = events.get(event.image_id)  # two spellings of one uri: an upsert wins
                if prev is None or prev.action == "delete":
                    events[event.image_id] = event
            elif error:
                bad.append(({"outbox_ids": sorted(set(ids)), **body}, error))
        return list(events.values()), bad

    def _dead_letter(self, conn: Connection, body: dict, error: str) -> None:
        from worker.ledger import Ledger, make_engine

        text = json.dumps(body, default=str)
        if self._dead_letters_inline:
            from worker.ledger.tables import dead_letters

            conn.execute(
                dead_letters.insert().values(
                    task=DEAD_LETTER_TASK, reason="invalid_event", error=error[:2000],
                    body=text[: Ledger.DEAD_LETTER_BODY_MAX], created_at=datetime.now(UTC),
                )
            )
            return
        if self._ledger is None:
            self._ledger = Ledger(make_engine(self.settings.effective_database_url))
        self._ledger.dead_letter(task=DEAD_LETTER_TASK, body=text, reason="invalid_event", error=error)

    def _purge_if_due(self) -> None:
        if time.monotonic() - self._last_purge < self.PURGE_EVERY:
            return
        cutoff = datetime.now(UTC) - self.RETENTION
        with self.engine.begin() as conn:
            n = conn.execute(outbox.delete().where(outbox.c.processed_at < cutoff)).rowcount
        self._last_purge = time.monotonic()
        if n:
            log.info("outbox: purged %d processed row(s) older than %s", n, self.RETENTION)


def _event_for(
    uri: str, rows: Sequence[Row], hint_sku: str | None, version: int, event_time: datetime
) -> tuple[ImageEvent | None, str, dict]:
    """The event for ``uri`` given its catalog rows: ``(event, "", body)`` or ``(None, error, body)``
    (error empty: nothing to publish)."""
    if bad := _undecodable(uri):
        return None, f"uri {bad} is not valid UTF-8: the catalog must store text as UTF-8", {"uri": bad, "sku": hint_sku}
    live = [r for r in rows if not r.deleted and not r.product_deleted and r.sku is not None]
    relative = _relative(uri)
    if live:
        row = max(live, key=lambda r: (_stamp(r.updated_at), r.id))  # one uri in two live rows: the newest
        crop = (row.crop_x, row.crop_y, row.crop_w, row.crop_h)
        body = {"uri": uri, "sku": row.sku, "action": "upsert", "image_row_id": row.id, "crop": crop}
        try:
            if relative:
                raise ValueError(relative)
            if bad := _undecodable(row.sku):
                raise ValueError(f"sku {bad} is not valid UTF-8: the catalog must store text as UTF-8")
            if any(c is not None for c in crop) and any(c is None for c in crop):
                raise ValueError(f"crop box {crop}: give all of crop_x, crop_y, crop_w, crop_h, or none")
            box = CropBox(x=crop[0], y=crop[1], w=crop[2], h=crop[3]) if crop[0] is not None else None
            event = ImageEvent(uri=uri, sku=row.sku, action=Action.upsert, version=version, crop=box,
                               event_time=event_time, source=SOURCE)
        except (ValidationError, ValueError) as exc:
            return None, f"uri {uri!r}: {exc}", body
        return event, "", body
    known = [r for r in rows if r.sku is not None]
    sku = max(known, key=lambda r: (_stamp(r.updated_at), r.id)).sku if known else hint_sku
    body = {"uri": uri, "sku": sku, "action": "delete"}
    try:
        normalize_uri(uri)
        if relative:
            raise ValueError(relative)
    except ValueError:
        log.debug("outbox: delete of %r skipped: such a uri never reached the index", uri)
        return None, "", body
    if not sku:
        return None, f"uri {uri!r}: deleted, but no SKU is known for it", body
    try:
        event = ImageEvent(uri=uri, sku=sku, action=Action.delete, version=version, event_time=event_time, source=SOURCE)
    except (ValidationError, ValueError) as exc:
        return None, f"uri {uri!r}: {exc}", body
    return event, "", body


def _lenient_text(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")


def _undecodable(text: str | None) -> str:
    """``text`` shown as the bytes a store wrote when they are not UTF-8 (read by
    :func:`_lenient_text`), else ""."""
    shown = escape_bytes(text or "")
    return f"'{shown}'" if shown != (text or "") else ""


def _relative(uri: str) -> str:
    """Why a catalog uri names no image (a path relative to nothing: it would resolve against the
    relay's working directory, a different image for every relay), or "" when it is absolute."""
    text = uri.strip()
    if urlparse(text).scheme or text.startswith("/"):
        return ""
    return "a relative path: catalog uris are s3://, http(s)://, file:// uris or absolute paths"


def _stamp(value: object) -> datetime:
    """A row's ``updated_at`` as an aware datetime for ordering, whatever form a store wrote it in
    (SQLite keeps any type): a datetime, ISO text, epoch seconds; anything else sorts first."""
    if isinstance(value, datetime):
        return _aware(value)
    text = str(value).strip() if value is not None else ""
    try:
        return _aware(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        pass
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except (ValueError, OverflowError, OSError):
        return datetime.min.replace(tzinfo=UTC)


def _aware(value: datetime | None) -> datetime:
    """SQLite hands back naive UTC datetimes."""
    if value is None:
        return datetime.now(UTC)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Listener:
    """``LISTEN`` on the outbox channel over a connection of its own (autocommit); reconnects."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        # the connection parameters as the relay's own engine passes them (a URL rendered again
        # re-encodes query values: options=-c%20… became -c+…, which the server refused)
        parsed = make_url(url).set(drivername="postgresql+psycopg")
        _args, params = parsed.get_dialect()().create_connect_args(parsed)
        params.pop("context", None)  # type adapters an engine's dialect adds, not a connection parameter
        self.params: dict[str, Any] = params
        self.conn: Any = None

    def open(self) -> None:
        import psycopg

        try:
            self.conn = psycopg.connect(**{"connect_timeout": 10, **self.params}, autocommit=True)
            self.conn.execute(f'LISTEN "{NOTIFY_CHANNEL}"')
        except psycopg.Error as exc:
            log.warning("outbox: LISTEN failed (%s); polling until it works", exc)
            self.close()

    def wait(self, seconds: float, stop: threading.Event, slice_seconds: float) -> bool:
        """Until a notification (True), ``seconds`` pass or ``stop`` is set (False)."""
        import psycopg

        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.conn is None:
                self.open()
                if self.conn is None:
                    stop.wait(left)
                    return False
            try:
                for _ in self.conn.notifies(timeout=min(left, slice_seconds), stop_after=1):
                    return True
            except psycopg.Error as exc:
                log.warning("outbox: notification connection lost (%s); polling", exc)
                self.close()
        return False

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


# --- the command -------------------------------------------------------------------------------


@handle_errors
def command(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Relay what is there, then exit (tests, cron).")] = False,
) -> None:
    """Relay catalog changes (outbox rows written by the catalog's triggers) to the pipeline.

    Upgrades the catalog schema first (idempotent). SIGTERM/SIGINT stop after the current batch.
    """
    from rich.text import Text

    from worker.cli.common import ensure_schema

    settings = settings_from(ctx)
    ensure_schema(settings)  # dead letters are kept in the state database; checked before the catalog is written
    revision = upgrade_catalog(settings.effective_catalog_url)
    relay = OutboxRelay(settings)
    where = safe_url(relay.url)
    try:
        if once:
            stats = _service_errors(settings, relay.url, relay.drain)
            err_console.print(
                f"outbox: relayed {stats.rows} row(s) from {where}: {stats.upserts} upsert(s), "
                f"{stats.deletes} delete(s), {stats.dead_letters} dead letter(s)", markup=False, highlight=False, soft_wrap=True
            )
            return
        serve_source_metrics(settings, SOURCE, extra=[OutboxCollector(relay.engine)])
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        wake = "LISTEN/NOTIFY + polling" if relay.postgres else "polling"
        err_console.print(
            Text.assemble(
                ("imgsync sources outbox", "bold green"),
                f": catalog {where} (schema {revision}), {wake} every {settings.outbox_poll_seconds:g} s, "
                f"batches of {settings.outbox_batch}. Ctrl-C stops.",
            ),
            highlight=False, soft_wrap=True,
        )
        relay.run(stop)
        err_console.print("outbox: stopped")
    finally:
        relay.close()


def _service_errors(settings: Settings, catalog_url: str, fn: Callable[[], RelayStats]) -> RelayStats:
    """``fn()``, with an unreachable catalog or broker turned into ServiceUnavailable (exit 3)."""
    from kombu.exceptions import OperationalError as BrokerError

    from worker.errors import ServiceUnavailable

    try:
        return fn()
    except sa.exc.OperationalError as exc:
        raise ServiceUnavailable("catalog database", SETTING, safe_url(catalog_url), str(exc.orig)) from exc
    except BrokerError as exc:
        raise ServiceUnavailable("broker", "IMGSYNC_BROKER_URL", settings.effective_broker_url, str(exc)) from exc
