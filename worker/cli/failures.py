"""``imgsync failures list|show|replay``: quarantined images, why, and a way back in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from schemas.events import image_id_for, normalize_uri
from schemas.outputs import DeadLetterItem, DeadLettersOutput, FailureItem, FailuresOutput, IndexOutput
from schemas.reasons import NAMED_AFTER_RETRIES, PERMANENT_REASONS, Reason
from worker.cli.common import EXIT_FAILURES, console, emit_json, ensure_schema, handle_errors, plain, settings_from, sku_option
from worker.errors import ConfigError
from worker.ledger import ImageRow, Ledger, make_engine

__all__ = ["failures_app"]

failures_app = typer.Typer(help="Failed images: list, show, replay; and messages set aside (dead-letters).", no_args_is_help=True)

ReasonOpt = Annotated[str | None, typer.Option(help=f"Only this reason code ({', '.join(r.value for r in Reason)}).")]
SkuOpt = Annotated[str | None, typer.Option(help="Only this SKU.")]
SinceOpt = Annotated[str | None, typer.Option(help="Only failures newer than this: 30m, 12h, 7d, or an ISO time.")]


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--since {text!r}: use 30m, 12h, 7d or an ISO time") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _reason(text: str | None) -> str | None:
    """A ``--reason`` a failed image can have: a transient cause (fetch_error, …) never is one (an
    image whose retries ran out ends ``retries_exhausted``), so filtering on it found nothing."""
    final = sorted(PERMANENT_REASONS | NAMED_AFTER_RETRIES)
    if text is not None and text not in final:
        why = " (a transient cause: its images end retries_exhausted)" if text in {r.value for r in Reason} else ""
        raise ConfigError(f"--reason {text!r}{why}: failed images have one of {', '.join(final)}")
    return text


def _item(r: ImageRow) -> FailureItem:
    return FailureItem(
        image_id=r.image_id, uri=r.uri, sku=r.sku, reason=r.reason, detail=r.detail,
        attempts=r.attempts, updated_at=r.updated_at, state=str(r.state),
    )  # fmt: skip


def _ledger(ctx: typer.Context) -> Ledger:
    settings = settings_from(ctx)
    ensure_schema(settings)
    return Ledger(make_engine(settings.effective_database_url))


@failures_app.command("list")
@handle_errors
def list_(
    ctx: typer.Context,
    reason: ReasonOpt = None,
    sku: SkuOpt = None,
    since: SinceOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many rows.")] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Failed images, newest first, with their reason codes (exit 1 when there are any)."""
    ledger = _ledger(ctx)
    rows = ledger.failures(reason=_reason(reason), sku=sku_option(sku), since=_since(since), limit=limit)
    doc = FailuresOutput(failures=[_item(r) for r in rows], by_reason=ledger.failure_counts())
    if json_out:
        emit_json(doc)
    else:
        table = Table("reason", "sku", "uri", "detail", title=f"failed images ({len(rows)} shown)")
        for f in doc.failures:
            table.add_row(plain(f.reason), plain(f.sku), plain(f.uri), plain((f.detail or "")[:80]))
        console.print(table)
        console.print("by reason: " + (", ".join(f"{k}={v}" for k, v in sorted(doc.by_reason.items())) or "none"))
    if rows:
        raise typer.Exit(EXIT_FAILURES)


@failures_app.command("show")
@handle_errors
def show(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="An image id or its uri/path.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Everything the ledger knows about one image (failed or not: see its state)."""
    ledger = _ledger(ctx)
    image_id = image if len(image) == 32 and all(c in "0123456789abcdef" for c in image) else image_id_for(normalize_uri(image))
    row = ledger.get(image_id)
    if row is None:
        raise ConfigError(f"no image {image!r} in the ledger")
    item = _item(row)
    if json_out:
        emit_json(item)
    else:
        table = Table(show_header=False, title=f"image {row.image_id}")
        for k, v in {**item.model_dump(), "version": row.version}.items():
            table.add_row(k, plain(v))
        console.print(table)


@failures_app.command("replay")
@handle_errors
def replay(
    ctx: typer.Context,
    reason: ReasonOpt = None,
    sku: SkuOpt = None,
    since: SinceOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the replayed images to their outcome.")] = False,
    timeout: Annotated[float | None, typer.Option(min=0, help="With --wait: give up after this many seconds.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Re-enqueue failed images (e.g. after their files were fixed); reports what happened to each."""
    from worker.cli.indexing import submit_and_report

    settings = settings_from(ctx)
    ledger = _ledger(ctx)
    rows = ledger.failures(reason=_reason(reason), sku=sku_option(sku), since=_since(since), limit=100_000)
    events = [r.event("replay") for r in rows]
    if not events:
        if json_out:
            emit_json(IndexOutput(results=[], queued=0))
        else:
            console.print("nothing to replay")
        return
    if not submit_and_report(
        settings, events, force=True, wait=wait, timeout=timeout, json_out=json_out, label="replaying"
    ):
        raise typer.Exit(EXIT_FAILURES)


@failures_app.command("dead-letters")
@handle_errors
def dead_letters(
    ctx: typer.Context,
    task: Annotated[
        str | None, typer.Option(help="Only this task or source: sources.sqs, sources.webhook, sources.outbox, or a pipeline task.")
    ] = None,
    since: SinceOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many rows.")] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Messages set aside because they can never be processed (not JSON, not an event, an invalid
    record or catalog row), newest first: who refused them, why, and the body as received (exit 1
    when there are any). Fix the sender; nothing here is retried."""
    ledger = _ledger(ctx)
    rows = ledger.dead_letter_rows(limit, task=task, since=_since(since))
    doc = DeadLettersOutput(dead_letters=[DeadLetterItem(**r) for r in rows], by_task=ledger.dead_letter_counts())
    if json_out:
        emit_json(doc)
    else:
        table = Table("when", "task", "reason", "error", "body", title=f"dead letters ({len(rows)} shown)")
        for d in doc.dead_letters:
            table.add_row(
                d.created_at.strftime("%Y-%m-%d %H:%M:%S"), plain(d.task), plain(d.reason), plain(d.error[:100]), plain(d.body[:60])
            )
        console.print(table)
        console.print("by task: " + (", ".join(f"{k}={v}" for k, v in sorted(doc.by_task.items())) or "none"))
    if rows:
        raise typer.Exit(EXIT_FAILURES)
