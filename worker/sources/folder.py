"""``imgsync sources folder [ROOT]``: keep the index in sync with a folder laid out ``<root>/<sku>/<image>``.

At start a full rescan publishes an upsert for every image file (the pipeline skips unchanged
content by hash, so an unchanged folder costs no forward pass) and a delete for every image the
ledger holds under the root whose file is gone. Then watchdog reports changes; a path is published
once it has been quiet for ``SETTLE_SECONDS`` (a file being written fires several events), from what
the disk holds *then*: a file present is an upsert, a path gone is a delete. Moves are a delete of
the old path and an upsert of the new one.

Versions: an upsert carries ``max(st_mtime_ns, st_ctime_ns)`` of the file, so an older event never
overrides a newer one and a rescan of an unchanged file repeats its version. The ctime is there
because the mtime alone can go back: a file restored from a backup or moved in with ``mv`` keeps
an old mtime and would lose against the delete before it; the ctime is set by the kernel when the
file appears at its path. A delete carries ``time.time_ns()``.

Hidden files and folders, temporary files (``.part``, ``.tmp``, ``~`` ...) and names whose suffix is
not an image suffix (:data:`worker.cli.indexing.IMAGE_SUFFIXES`) are ignored, and so are files
directly in the root (they have no SKU folder).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from config.settings import Settings
from schemas.events import Action, ImageEvent, escape_bytes, invalid_reasons, normalize_uri, path_from_uri
from worker.cli.common import err_console, handle_errors, settings_from
from worker.fetch.local import walk_tree
from worker.metrics.sources import count_round, declare_source, serve_source_metrics, source_metrics

__all__ = ["FolderSource", "FolderStats", "command"]

log = logging.getLogger(__name__)

SOURCE = "folder"


@dataclass
class FolderStats:
    """Events a rescan or the watcher published."""

    upserts: int = 0
    deletes: int = 0


class FolderSource:
    """Publishes events for the images under ``root`` (default ``IMGSYNC_WATCH_FOLDER``).

    ``rescan()`` once, or ``run(stop)`` in a thread until ``stop`` is set. ``publish`` is
    :func:`worker.sources.common.publish_events` unless a test hands in its own.
    """

    #: seconds a path must stay quiet before it is published (writes fire bursts of events)
    SETTLE_SECONDS = 0.5
    #: paths waiting to settle; beyond this the watcher drops them and rescans once things are quiet
    MAX_PENDING = 10_000
    #: events per publish call
    PUBLISH_CHUNK = 500
    #: endings of partial downloads and editor scratch files (besides hidden names)
    TEMP_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".swp", "~")
    #: seconds between two looks at the settled paths
    TICK_SECONDS = 0.1
    #: longest pause between rescan retries while the broker or the state database is away, seconds
    MAX_BACKOFF = 30.0
    #: seconds before changed paths whose publishing failed are tried again
    RETRY_SECONDS = 2.0

    def __init__(
        self,
        settings: Settings,
        root: Path | None = None,
        *,
        publish: Callable[[Settings, Sequence[ImageEvent]], str] | None = None,
    ) -> None:
        from worker.sources.common import publish_events

        self.settings = settings
        self.root = path_from_uri(normalize_uri(str(root or settings.effective_watch_folder)))  # as image uris name it
        self._publish = publish or publish_events
        self._pending: dict[Path, tuple[float, bool]] = {}  # path -> (publish after, is a folder)
        self._lock = threading.Lock()
        self._overflow = False
        self._last_note = 0.0
        self._ledger: Any = None
        self._invalid: set[str] = set()  # paths already warned about

    # --- what a path means -----------------------------------------------------------------------

    def sku_of(self, path: Path) -> str | None:
        """The SKU of an image path under the root, or None when the path is not one to index."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        name = rel.name.lower()
        if (
            len(rel.parts) < 2
            or any(part.startswith(".") for part in rel.parts)
            or name.endswith(self.TEMP_SUFFIXES)
            or Path(name).suffix not in _image_suffixes()
        ):
            return None
        return rel.parts[0]

    def upsert_for(self, path: Path) -> ImageEvent | None:
        """The upsert event of an image file as it is now (None: not an image to index, or gone)."""
        sku = self.sku_of(path)
        if sku is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        return self._event(str(path), sku, Action.upsert, max(st.st_mtime_ns, st.st_ctime_ns))

    def delete_for(self, uri: str, sku: str) -> ImageEvent | None:
        """The delete event of an image that is gone, versioned now."""
        return self._event(uri, sku, Action.delete, time.time_ns())

    def _event(self, uri: str, sku: str, action: Action, version: int) -> ImageEvent | None:
        """The event, or None for a path that names no valid image (a SKU folder named with control
        characters, bytes that are not UTF-8, more than 256 characters): warned about once and
        counted invalid. Raising would have failed the whole rescan, retried forever."""
        try:
            return ImageEvent(uri=uri, sku=sku, action=action, version=version, source=SOURCE)
        except ValidationError as exc:
            if uri not in self._invalid:
                self._invalid.add(uri)
                log.warning("folder: %s is not indexed: %s", escape_bytes(uri), invalid_reasons(exc))
                source_metrics().events.labels(SOURCE, "invalid").inc()
            return None

    # --- rescan ----------------------------------------------------------------------------------

    def rescan(self) -> FolderStats:
        """Publish an upsert per image file under the root and a delete per image the ledger holds
        under the root whose file is gone; returns the counts."""
        stats = FolderStats()
        stats.upserts = self._publish_all(self._files(self.root))
        stats.deletes = self._publish_all(self.gone_under(self.root))
        log.info("folder: rescan of %s: %d upsert(s), %d delete(s)", self.root, stats.upserts, stats.deletes)
        return stats

    def _files(self, top: Path) -> Iterator[ImageEvent]:
        for path in walk_tree(top):
            event = self.upsert_for(path)
            if event is not None:
                yield event

    def gone_under(self, top: Path) -> Iterator[ImageEvent]:
        """A delete per image the ledger holds under ``top`` whose file is gone."""
        return gone_under(self.ledger, top, SOURCE)

    def _publish_all(self, events: Iterable[ImageEvent]) -> int:
        n, chunk = 0, []
        for event in events:
            chunk.append(event)
            if len(chunk) >= self.PUBLISH_CHUNK:
                self._publish_chunk(chunk)
                n, chunk = n + len(chunk), []
        if chunk:
            self._publish_chunk(chunk)
            n += len(chunk)
        return n

    def _publish_chunk(self, chunk: Sequence[ImageEvent]) -> None:
        self._publish(self.settings, chunk)
        count_round(SOURCE, published=len(chunk))

    @property
    def ledger(self) -> Any:
        if self._ledger is None:
            from worker.ledger import Ledger, make_engine

            self._ledger = Ledger(make_engine(self.settings.effective_database_url))
        return self._ledger

    # --- watching --------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Rescan, then publish changes as they settle, until ``stop`` is set; retries with backoff
        while the broker or the state database is away.

        Raises:
            ConfigError: the root cannot be watched (e.g. the inotify watch limit is reached).
        """
        from watchdog.observers import Observer

        from worker.errors import ConfigError

        declare_source(SOURCE)  # also inside `imgsync up`, whose exporter serves them
        self.root.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(self._note), str(self.root), recursive=True)
        try:
            observer.start()  # before the rescan: what changes meanwhile is seen twice, never missed
        except OSError as exc:
            raise ConfigError(f"cannot watch {self.root}: {exc} (Linux: raise fs.inotify.max_user_watches)") from exc
        try:
            self._until_done(self.rescan, stop)
            while not stop.wait(self.TICK_SECONDS):
                if self._overflow and time.monotonic() - self._last_note >= self.SETTLE_SECONDS:
                    self._overflow = False
                    log.warning("folder: more than %d paths changed at once; rescanning %s", self.MAX_PENDING, self.root)
                    self._until_done(self.rescan, stop)
                self._flush_settled()
                with self._lock:
                    idle = not self._pending and not self._overflow
                if idle:  # nothing left to publish: the source is up to date
                    count_round(SOURCE)
        finally:
            observer.stop()
            observer.join(timeout=10)

    def _note(self, path: str, is_dir: bool) -> None:
        """Called on watchdog's thread: remember the path until it settles."""
        now = time.monotonic()
        with self._lock:
            self._last_note = now
            if self._overflow:
                return
            p = Path(path)
            if p not in self._pending and len(self._pending) >= self.MAX_PENDING:
                self._pending.clear()
                self._overflow = True
                return
            was_dir = self._pending.get(p, (0.0, False))[1]
            self._pending[p] = (now + self.SETTLE_SECONDS, is_dir or was_dir)

    def _flush_settled(self) -> None:
        now = time.monotonic()
        with self._lock:
            ready = [(p, d) for p, (at, d) in self._pending.items() if at <= now]
            for p, _ in ready:
                del self._pending[p]
        if not ready:
            return
        try:
            events: dict[str, ImageEvent] = {}
            for path, is_dir in ready:
                for event in self._events_for(path, is_dir):
                    events[event.image_id] = event
            self._publish_all(events.values())
        except Exception as exc:  # noqa: BLE001 - broker or state DB away: keep the paths, retry
            count_round(SOURCE, failed=True)
            retry_at = time.monotonic() + self.RETRY_SECONDS
            log.warning("folder: publishing failed (%s); retrying in %.0f s", exc, self.RETRY_SECONDS, exc_info=log.isEnabledFor(logging.DEBUG))
            with self._lock:
                for p, d in ready:
                    self._pending.setdefault(p, (retry_at, d))
            return
        ups = sum(1 for e in events.values() if e.action == "upsert")
        log.info("folder: %d upsert(s), %d delete(s)", ups, len(events) - ups)

    def _events_for(self, path: Path, is_dir: bool) -> Iterator[ImageEvent]:
        if path.is_dir():
            if is_dir:  # a folder created or moved in: its files (watchdog may not report them),
                for event in self._files(path):  # except those still being written
                    with self._lock:
                        busy = path_from_uri(event.uri) in self._pending
                    if not busy:
                        yield event
            return
        event = self.upsert_for(path)
        if event is not None:
            yield event
            return
        if path.exists():
            return
        if is_dir:  # a folder deleted or moved away: whatever the ledger holds under it
            yield from self.gone_under(path)
            return
        sku = self.sku_of(path)
        if sku is not None and (event := self.delete_for(str(path), sku)) is not None:
            yield event

    def _until_done(self, fn: Callable[[], object], stop: threading.Event) -> None:
        backoff = 0.0
        while not stop.is_set():
            try:
                fn()
                return
            except Exception as exc:  # noqa: BLE001 - broker or state DB away: retry
                count_round(SOURCE, failed=True)
                backoff = min(max(backoff * 2, 1.0), self.MAX_BACKOFF)
                log.warning("folder: %s; retrying in %.0f s", exc, backoff, exc_info=log.isEnabledFor(logging.DEBUG))
                stop.wait(backoff)


def gone_under(ledger: Any, top: Path, source: str) -> Iterator[ImageEvent]:
    """A delete, versioned now, per image the ledger holds (not deleted) at or under ``top`` (a folder,
    or a file or folder that is gone) whose file is gone: the folder source's rescan, and
    ``imgsync index FOLDER --prune``."""
    base = top.as_uri()
    for row in ledger.select(uri_prefix=base):
        if row.uri != base and not row.uri.startswith(base + "/"):
            continue  # a sibling whose name extends top's ("cat-2" beside "cat")
        if not path_from_uri(row.uri).exists():
            yield ImageEvent(uri=row.uri, sku=row.sku, action=Action.delete, version=time.time_ns(), source=source)


def _image_suffixes() -> frozenset[str]:
    from worker.cli.indexing import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


class _Handler:
    """watchdog handler: every path an event names goes to ``note`` (files and folders created,
    modified, moved or deleted; a folder's own "modified" says nothing about its files)."""

    def __init__(self, note: Callable[[str, bool], None]) -> None:
        self.note = note

    def dispatch(self, event: Any) -> None:
        if event.event_type in ("opened", "closed_no_write") or (event.is_directory and event.event_type == "modified"):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.note(os.fsdecode(path), event.is_directory)


# --- the command -------------------------------------------------------------------------------


@handle_errors
def command(
    ctx: typer.Context,
    root: Annotated[
        Path | None, typer.Argument(help="Folder laid out <sku>/<image>. Default: IMGSYNC_WATCH_FOLDER or IMGSYNC_HOME/catalog.")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Rescan, publish, exit (tests, cron).")] = False,
) -> None:
    """Watch a folder <sku>/<image> and publish its changes; a rescan at start catches what changed
    while it was down. SIGTERM/SIGINT stop it."""
    from rich.text import Text

    from worker.cli.common import ensure_schema
    from worker.errors import ConfigError

    settings = settings_from(ctx)
    if root is not None and not root.expanduser().is_dir():
        raise ConfigError(f"{root}: no such folder (the folder source watches <root>/<sku>/<image>)")
    ensure_schema(settings)  # the rescan compares with the ledger
    source = FolderSource(settings, root)
    if once:
        if not source.root.is_dir():
            raise ConfigError(f"{source.root}: no such folder (IMGSYNC_WATCH_FOLDER)")
        stats = _broker_errors(settings, source.rescan)
        err_console.print(
            f"folder: {source.root}: {stats.upserts} upsert(s), {stats.deletes} delete(s)",
            markup=False, highlight=False, soft_wrap=True,
        )
        return
    serve_source_metrics(settings, SOURCE)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    err_console.print(
        Text.assemble(("imgsync sources folder", "bold green"), f": watching {source.root}. Ctrl-C stops."),
        highlight=False, soft_wrap=True,
    )
    source.run(stop)
    err_console.print("folder: stopped")


def _broker_errors(settings: Settings, fn: Callable[[], FolderStats]) -> FolderStats:
    """``fn()``, with an unreachable broker turned into ServiceUnavailable (exit 3)."""
    from kombu.exceptions import OperationalError as BrokerError

    from worker.errors import ServiceUnavailable

    try:
        return fn()
    except BrokerError as exc:
        raise ServiceUnavailable("broker", "IMGSYNC_BROKER_URL", settings.effective_broker_url, str(exc)) from exc
