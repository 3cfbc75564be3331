"""``imgsync index``: turn paths/URIs into events, publish them, and follow them to their outcome."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import ValidationError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from config.settings import Settings
from schemas.events import Action, ImageEvent, escape_bytes, invalid_reasons, normalize_uri, normalize_version, path_from_uri
from schemas.outputs import IndexResult
from worker.errors import ConfigError
from worker.ledger import Ledger, make_engine

__all__ = ["collect_events", "publish", "in_bucket_order", "wait_for", "submit_and_report", "print_results", "IMAGE_SUFFIXES"]

#: File name endings picked up when a folder is indexed (the bytes decide the format later).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".avif", ".heic", ".heif"}
)

#: seconds between polls of the ledger while waiting
POLL_SECONDS = 0.25
#: every this many polls, read every image still waited for (not only this request's finished ones)
FULL_SCAN_EVERY = 20
#: how far back an incremental poll looks, for writers' clocks and commit delays
CLOCK_SLACK = timedelta(seconds=5)
#: seconds without any image finishing before ``--wait`` suggests checking the workers
STALL_HINT_SECONDS = 30.0


def collect_events(targets: Sequence[str], sku: str | None, *, missing_ok: bool = False) -> list[ImageEvent]:
    """Events for files, folders laid out ``<sku>/<image>``, and ``s3://`` / ``http(s)://`` URIs.

    A file's SKU is the folder it lies in, a URL's the last folder of its path (percent-decoded), and
    a folder holding images only directly (a SKU folder itself) gives them its name. ``missing_ok``
    (``--prune``): a path that is gone gives no event instead of an error.

    Raises:
        ConfigError: a path that does not exist, or an image whose SKU cannot be told.
    """
    events: dict[str, ImageEvent] = {}
    for target in targets:
        local = _local_path(target) if missing_ok else None
        if local is not None and not local.exists():
            continue
        for uri, image_sku in _expand(target, sku):
            try:
                ev = ImageEvent(uri=uri, sku=image_sku, source="cli")
            except ValidationError as exc:  # a SKU folder named with control characters or other bytes
                raise ConfigError(f"{escape_bytes(uri)}: {invalid_reasons(exc)}" + ("" if sku else " (pass --sku)")) from exc
            events.setdefault(ev.image_id, ev)
    return list(events.values())


def pruned_events(settings: Settings, targets: Sequence[str], present: set[str]) -> list[ImageEvent]:
    """``index --prune``: a delete per image the ledger holds under each folder target whose file is
    gone (not one of ``present``, the images being indexed). A target that is gone itself (a SKU
    folder or a file removed) prunes what the ledger holds there.

    Raises:
        ConfigError: no target is a local folder or a local path that is gone.
    """
    from worker.sources.folder import gone_under

    folders = [p for p in (_local_path(t) for t in targets) if p is not None and (p.is_dir() or not p.exists())]
    if not folders:
        raise ConfigError("--prune deletes what is gone from a folder: give at least one local folder")
    ledger = Ledger(make_engine(settings.effective_database_url))
    try:
        out: dict[str, ImageEvent] = {}
        for folder in folders:
            for ev in gone_under(ledger, folder, "cli"):
                if ev.image_id not in present:
                    out.setdefault(ev.image_id, ev)
    finally:
        ledger.engine.dispose()
    return list(out.values())


def _local_path(target: str) -> Path | None:
    """The local path a target names as image uris name it (absolute, links kept); None for a URL or
    a target that names no local path."""
    if urlparse(target).scheme in ("s3", "http", "https"):
        return None
    try:
        return path_from_uri(normalize_uri(target))
    except ValueError:
        return None


def _expand(target: str, sku: str | None) -> Iterable[tuple[str, str]]:
    from worker.fetch.local import walk_tree

    parsed = urlparse(target)
    if parsed.scheme in ("s3", "http", "https"):
        parts = [p for p in parsed.path.split("/") if p]
        if parsed.scheme != "s3":  # a URL's path is percent-encoded; an s3:// uri names the key as it is
            parts = [unquote(p) for p in parts]
        image_sku = sku or (parts[-2] if len(parts) >= 2 else None)
        if not image_sku:
            raise ConfigError(f"{target}: cannot tell its SKU from the key; pass --sku")
        yield target, image_sku
        return
    try:  # a path or a file:// uri, named as image uris name files
        path = path_from_uri(normalize_uri(target))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not path.exists():
        raise ConfigError(f"{target}: no such file or folder")
    if path.is_file():  # its SKU is the folder it lies in (not the folder a symbolic link points to)
        yield str(path), sku or path.parent.name
        return
    files = [f for f in walk_tree(path) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    flat = [f for f in files if f.parent == path]
    if sku:
        yield from ((str(f), sku) for f in files)
    elif flat and len(flat) == len(files):  # a SKU folder itself: its images take its name, as one file does
        yield from ((str(f), path.name) for f in files)
    elif flat:
        raise ConfigError(
            f"{flat[0]}: {path} holds images both directly and in SKU folders (layout <sku>/<image>); "
            "move them into a SKU folder, or pass --sku"
        )
    else:
        yield from ((str(f), f.relative_to(path).parts[0]) for f in files)


def publish(settings: Settings, events: Sequence[ImageEvent], *, force: bool = False) -> str:
    """Publish preprocess tasks for ``events``; returns the request id that tags them in the ledger."""
    from worker.celery_app import configure, dispatcher, runtime
    from worker.pipeline import settle_unchanged, submit

    configure(settings)
    rt = runtime()
    request_id = uuid.uuid4().hex
    events = in_bucket_order(rt.ledger, events)
    todo = list(events) if force else settle_unchanged(rt, events, request_id)
    submit(rt.ledger, dispatcher(), todo, request_id, force=force)
    return request_id


def in_bucket_order(ledger: Ledger, events: Sequence[ImageEvent]) -> list[ImageEvent]:
    """``events`` with each ``s3://`` object's version set to the one the ledger holds for it, or to
    the lowest version for an object it has not seen.

    The bucket's own events (SQS, webhook) are ordered by S3's ``sequencer``, a number of another
    scale than the clock a manual ``index`` would stamp: a clock version outranks every sequencer,
    so a bucket backfilled with ``imgsync index s3://…`` would then take each later upload or delete
    from the bucket's events as stale. Keeping the ledger's version re-reads the object now and
    leaves the next event of the bucket newer, whatever it is.
    """
    keyed = [e.image_id for e in events if e.uri.startswith("s3://")]
    if not keyed:
        return list(events)
    known = ledger.known_images(keyed)
    lowest = normalize_version(0)
    out = []
    for event in events:
        if event.uri.startswith("s3://"):
            row = known[event.image_id].row
            event = event.model_copy(update={"version": row.version if row is not None else lowest})
        out.append(event)
    return out


def wait_for(
    settings: Settings,
    events: Sequence[ImageEvent],
    request_id: str,
    *,
    timeout: float | None = None,
    show_progress: bool = True,
    label: str = "indexing",
    give_up: Callable[[], str | None] | None = None,
) -> list[IndexResult]:
    """Follow each event in the ledger until it has an outcome (or ``timeout`` seconds pass, or
    ``give_up`` names a reason, e.g. the stack doing the work ended: it is printed). Images still
    waiting are reported ``pending``."""
    ledger = Ledger(make_engine(settings.effective_database_url))
    by_id = {ev.image_id: ev for ev in events}
    done: dict[str, IndexResult] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    from worker.cli.common import err_console

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
        disable=not show_progress,
    )
    try:
        with progress:
            task = progress.add_task(label, total=len(by_id), failed=0)
            last_change, hinted = time.monotonic(), False
            since: datetime | None = None
            for poll in itertools.count():
                before = len(done)
                watermark = datetime.now(UTC) - CLOCK_SLACK
                if poll % FULL_SCAN_EVERY == 0:  # every waiting row: also catches events overtaken by newer ones
                    candidates = ledger.rows([i for i in by_id if i not in done]).items()
                else:  # only rows of this request finished since the last poll (indexed lookup)
                    candidates = [
                        (r.image_id, r)
                        for r in ledger.finished_rows(request_id, since)
                        if r.image_id in by_id and r.image_id not in done
                    ]
                since = watermark
                for image_id, row in candidates:
                    outcome = None
                    ev = by_id[image_id]
                    pruning = ev.action is Action.delete  # index --prune
                    if row.request_id == request_id and row.outcome:
                        outcome = "deleted" if pruning and row.outcome == "indexed" else row.outcome
                    elif row.version > ev.version and row.state != "pending":
                        # a newer event for the image overtook ours: report where it stands now
                        outcome = "indexed" if row.state == "deleted" and not pruning else row.state
                    if outcome:
                        done[image_id] = IndexResult(
                            uri=ev.uri,
                            image_id=image_id,
                            sku=ev.sku,
                            outcome=outcome,  # type: ignore[arg-type]
                            reason=row.reason if outcome == "failed" else None,
                        )
                failed = sum(r.outcome == "failed" for r in done.values())
                progress.update(task, completed=len(done), failed=failed)
                if len(done) != before:
                    last_change = time.monotonic()
                elif not hinted and time.monotonic() - last_change > STALL_HINT_SECONDS:
                    hinted = True
                    err_console.print(f"[yellow]{escape(_stall_hint(settings))}[/]", highlight=False)
                if len(done) == len(by_id) or (deadline is not None and time.monotonic() > deadline):
                    break
                why = give_up() if give_up is not None else None
                if why:
                    err_console.print(f"[bold red]stopped waiting: {escape(why)}[/]", highlight=False)
                    break
                time.sleep(POLL_SECONDS)
    finally:
        ledger.engine.dispose()
    results = []
    for image_id, ev in by_id.items():
        results.append(
            done.get(image_id)
            or IndexResult(uri=ev.uri, image_id=image_id, sku=ev.sku, outcome="pending", reason=None)
        )
    return results


def _stall_hint(settings: Settings) -> str:
    """What to say when nothing has progressed for a while: a full disk under IMGSYNC_HOME when that
    is it, else the usual suspects."""
    from worker.status import disk_problem

    disk = disk_problem(settings)
    if disk is not None:
        return f"no progress for {STALL_HINT_SECONDS:.0f}s: {disk}"
    return (
        f"no progress for {STALL_HINT_SECONDS:.0f}s: are workers running? "
        "(`imgsync up` for the embedded stack; `imgsync status` shows queue depths)"
    )


def _settled(settings: Settings, events: Sequence[ImageEvent], request_id: str) -> list[IndexResult]:
    """Results of the events that got their outcome while being published (unchanged local files,
    events older than what the ledger holds), in the order of ``events``."""
    ledger = Ledger(make_engine(settings.effective_database_url))
    try:
        finished = {r.image_id: r for r in ledger.finished_rows(request_id)}
    finally:
        ledger.engine.dispose()
    return [
        IndexResult(uri=ev.uri, image_id=ev.image_id, sku=ev.sku, outcome="unchanged")
        for ev in events
        if ev.image_id in finished and finished[ev.image_id].outcome == "unchanged"
    ]


def print_results(results: Sequence[IndexResult]) -> None:
    """A table of what did not get indexed, then counts per outcome."""
    from rich.table import Table

    from worker.cli.common import console, plain

    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    failed = [r for r in results if r.outcome not in ("indexed", "unchanged", "deleted")]
    if failed:
        table = Table("outcome", "reason", "sku", "uri", title="not indexed")
        for r in failed[:50]:
            table.add_row(r.outcome, plain(r.reason), plain(r.sku), plain(r.uri))
        console.print(table)
    console.print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


def submit_and_report(
    settings: Settings,
    events: Sequence[ImageEvent],
    *,
    force: bool,
    wait: bool,
    timeout: float | None,
    json_out: bool,
    label: str = "indexing",
) -> bool:
    """Publish ``events``; without ``wait`` report the request, with it follow and report each image.

    Returns True when every image ended indexed or unchanged (or nothing was awaited).
    """
    from schemas.outputs import IndexOutput
    from worker.cli.common import console, emit_json

    request_id = publish(settings, events, force=force)
    settled = _settled(settings, events, request_id)  # unchanged or stale: answered without a worker
    queued = len(events) - len(settled)
    if not wait:
        if json_out:
            emit_json(IndexOutput(results=settled, request_id=request_id, queued=queued))
        else:
            console.print(
                f"{label}: queued {queued} image(s), {len(settled)} unchanged (request {request_id})"
            )
        return True
    results = wait_for(settings, events, request_id, timeout=timeout, show_progress=not json_out, label=label)
    if json_out:
        emit_json(IndexOutput(results=results, request_id=request_id, queued=queued))
    else:
        print_results(results)
    return not any(r.outcome in ("failed", "pending") for r in results)
