"""``imgsync reindex``: re-run images of a scope through the pipeline, with a dry run and a live
progress bar that follows the ledger. Unchanged images (same content, model and preprocessing) cost
no forward pass, so a rerun after an interruption only pays for what is left."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from schemas.events import normalize_uri
from schemas.outputs import IndexOutput
from worker.cli.common import EXIT_FAILURES, console, emit_json, ensure_schema, handle_errors, settings_from, sku_option
from worker.errors import ConfigError
from worker.ledger import ImageState, Ledger, make_engine

__all__ = ["reindex"]

#: how far back the indexing rate for the dry run's estimate is measured
RATE_WINDOW = timedelta(hours=1)


@handle_errors
def reindex(
    ctx: typer.Context,
    sku: Annotated[str | None, typer.Option(help="Only this SKU.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Only images whose uri (or local path) starts with this.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every image the ledger holds (deleted ones excepted).")] = False,
    failed: Annotated[bool, typer.Option("--failed", help="Only failed images.")] = False,
    model: Annotated[str | None, typer.Option(help="Build this model's version (spec backend:name\\[@weights]) in the background while the serving one answers; then `imgsync cutover`.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be done; change nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Re-encode even unchanged images.")] = False,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the work with a progress bar.")] = True,
    timeout: Annotated[float | None, typer.Option(min=0, help="With --wait: give up after this many seconds.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Re-index a scope: --sku, --prefix, --all or --failed (exactly one)."""
    from worker.cli.indexing import submit_and_report

    sku = sku_option(sku)
    chosen = [name for name, on in (("--sku", sku), ("--prefix", prefix), ("--all", all_), ("--failed", failed)) if on]
    if len(chosen) != 1:
        raise ConfigError("give exactly one scope: --sku S, --prefix P, --all or --failed")
    settings = settings_from(ctx)
    if model is not None and failed:
        raise ConfigError("--failed re-runs failed images through every version: give it without --model")
    ensure_schema(settings)
    ledger = Ledger(make_engine(settings.effective_database_url))
    serving = ledger.serving_version()
    uri_prefix = None
    if prefix:
        uri_prefix = prefix if "://" in prefix else _local_prefix(prefix, ledger)
    states = (ImageState.failed,) if failed else (ImageState.pending, ImageState.indexed, ImageState.failed)
    rate = ledger.indexing_rate(datetime.now(UTC) - RATE_WINDOW)
    if model is not None and not (serving is not None and model.strip() in (serving.spec, serving.model_id)):
        from dataclasses import replace

        from worker.cli.versions import build_version
        from worker.encoders import create_encoder
        from worker.encoders.spec import spec_given_by

        with spec_given_by("--model"):  # a spec that cannot load is refused before anything, dry run included
            create_encoder(replace(settings.encoder, spec=model.strip())).precheck()

        ok = build_version(
            settings, model.strip(), lambda: ledger.select(sku=sku, uri_prefix=uri_prefix, states=states),
            dry_run=dry_run, force=force, wait=wait, timeout=timeout, json_out=json_out, rate=rate,
            narrow_scope=bool(sku or prefix),
        )  # fmt: skip
        if not ok:
            raise typer.Exit(EXIT_FAILURES)
        return
    rows = ledger.select(sku=sku, uri_prefix=uri_prefix, states=states)
    skus = sorted({r.sku for r in rows})
    estimate = round(len(rows) / rate, 1) if rate else None
    plan = {
        "scope": chosen[0],
        "images": len(rows),
        "skus": len(skus),
        "dry_run": dry_run,
        "estimated_seconds": estimate,
        "measured_images_per_second": round(rate, 3) if rate else None,
    }
    if dry_run:
        if json_out:
            emit_json(plan)
        else:
            eta = f"~{estimate:.0f}s at the last hour's {rate:.2f} images/s" if estimate else "unknown (no recent throughput)"
            console.print(f"would re-index {len(rows)} image(s) over {len(skus)} SKU(s); estimated time {eta}")
        return
    if not rows:  # answered like `index --wait` (and `failures replay`) with no image: nothing failed
        if json_out:
            emit_json(IndexOutput(results=[], queued=0))
        else:
            console.print(f"nothing to re-index: no image in {' '.join(x for x in (chosen[0], sku or prefix) if x)}")
        return
    events = [r.event("reindex") for r in rows]
    if not json_out:
        console.print(f"re-indexing {len(rows)} image(s) over {len(skus)} SKU(s)")
    if not submit_and_report(settings, events, force=force, wait=wait, timeout=timeout, json_out=json_out, label="re-indexing"):
        raise typer.Exit(EXIT_FAILURES)


def _local_prefix(prefix: str, ledger: Ledger) -> str:
    """The uri prefix a local path names: a folder (what lies under it, not ``SKU-10`` beside
    ``SKU-1``) when it ends with ``/``, is a folder, or is gone while the ledger holds images under
    it as a folder (its files were removed: the same scope as before); else the start of file names."""
    base = normalize_uri(prefix)
    path = Path(prefix).expanduser()
    if prefix.endswith("/") or path.is_dir() or (not path.exists() and ledger.select(uri_prefix=base + "/")):
        return base + "/"
    return base
