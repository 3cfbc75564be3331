"""Model versions from the command line: build one in the background (``reindex --model``), follow
its coverage, ``cutover`` to it and ``rollback``. Search keeps answering from the serving version
the whole time: a cutover is one ``alter_alias`` per alias."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from config.settings import Settings
from schemas.tasks import PreprocessPayload
from worker.cli.common import (
    EXIT_FAILURES,
    console,
    emit_json,
    ensure_schema,
    err_console,
    handle_errors,
    milvus_session,
    plain,
    settings_from,
)
from worker.encoders.spec import spec_given_by
from worker.errors import ConfigError
from worker.ledger import ImageRow, ImageState, Ledger, VersionRow, VersionStatus, make_engine

__all__ = ["cutover", "rollback", "retire", "build_version", "id_prefix", "resolve_version"]

#: seconds between polls of the ledger while following a build
POLL_SECONDS = 0.5
#: seconds added to the workers' version cache time before a new version's build is sent
SEEN_MARGIN_SECONDS = 0.5


def resolve_version(ledger: Ledger, text: str) -> VersionRow:
    """A version by its model id, its spec, or an unambiguous prefix of its model id.

    Raises:
        ConfigError: no such version, or several match (the message lists the known ones).
    """
    text = text.strip()
    if not text:
        raise ConfigError("an empty model version: give its model id, its spec or a prefix of its id")
    every = ledger.versions((VersionStatus.serving, VersionStatus.standby, VersionStatus.building, VersionStatus.retired))
    exact = [v for v in every if v.model_id == text]
    matches = exact or [v for v in every if _same_spec(v, text)] or [v for v in every if id_prefix(v.model_id, text)]
    if len(matches) == 1:
        return matches[0]
    known = "; ".join(f"{v.model_id} ({v.status})" for v in every) or "none yet"
    what = "matches several versions" if matches else "is not a known model version"
    raise ConfigError(f"{text!r} {what}: known versions: {known}")


def id_prefix(model_id: str, text: str) -> bool:
    """``text`` starts ``model_id``; within the model's name (before its ``@`` weights) it must end
    where a part of the name ends: ``random:6`` is another model than ``random:64@…``, while
    ``random:64@pixels-sha256#d4`` may stop anywhere in the digest."""
    if not model_id.startswith(text):
        return False
    rest = model_id[len(text) :]
    return not rest or "@" in text or not (rest[0].isalnum() and text[-1].isalnum())


def _same_spec(version: VersionRow, text: str) -> bool:
    """True when ``text`` is the spec ``version`` was built with, as given or with its local paths
    made absolute (as the ledger keeps it)."""
    from worker.encoders.spec import anchored_spec

    if version.spec == text:
        return True
    try:
        return version.spec == anchored_spec(text)
    except ConfigError:  # not a spec: a model id or its prefix
        return False


def build_version(
    settings: Settings,
    spec: str,
    select: Callable[[], Sequence[ImageRow]],
    *,
    dry_run: bool,
    force: bool,
    wait: bool,
    timeout: float | None,
    json_out: bool,
    rate: float | None = None,
    narrow_scope: bool = False,
) -> bool:
    """Fill the version of ``spec`` for the images ``select`` returns while the serving version keeps
    answering.

    ``narrow_scope`` (``--sku``/``--prefix``): a scope that holds no image does not register a new
    version (a mistyped SKU would otherwise start a version every upload is encoded for, twice the
    work, until it is retired); the plan is shown with status ``new`` and nothing is queued.

    Images the version already holds a current vector for are not sent again, so a rerun after an
    interruption only pays for what is left. A version that was not active is sent its images only
    once every worker sees it (they re-read the versions every ``Runtime.VERSIONS_TTL``): a worker
    would drop them as stale, and would not write an upload of that moment to it. Returns True
    when every image got its vector.
    """
    from worker.index.milvus_store import store_for
    from worker.runtime import Runtime

    rt = Runtime(settings)
    try:
        with milvus_session(settings) as uri:
            rt.__dict__["store"] = store_for(settings, uri)
            peek = _peek_version(rt.ledger, spec)
            active = {v.model_id for v in rt.ledger.versions()}
            nothing = narrow_scope and not any(r.state in (ImageState.indexed, ImageState.pending) for r in select())
            if dry_run or (nothing and (peek is None or peek.model_id not in active)):
                if not dry_run:
                    err_console.print(f"no image in this scope: {spec} is not registered as a version")
                target = peek if dry_run else None
            else:
                with spec_given_by("--model"):
                    target = rt.register_candidate(spec)
                if target.model_id not in active:
                    time.sleep(Runtime.VERSIONS_TTL + SEEN_MARGIN_SECONDS)
            rt.store.close()
        return _build(settings, rt.ledger, spec, target, select(), dry_run=dry_run, force=force, wait=wait,
                      timeout=timeout, json_out=json_out, rate=rate)
    finally:
        rt.ledger.engine.dispose()


def _build(
    settings: Settings,
    ledger: Ledger,
    spec: str,
    target: VersionRow | None,
    rows: Sequence[ImageRow],
    *,
    dry_run: bool,
    force: bool,
    wait: bool,
    timeout: float | None,
    json_out: bool,
    rate: float | None,
) -> bool:
    from worker.celery_app import configure, dispatcher

    by_id = {r.image_id: r for r in rows if r.state in (ImageState.indexed, ImageState.pending)}
    ids = list(by_id)
    held = ledger.held_by(target.model_id, ids) if target is not None else set()
    todo = ids if force else [i for i in ids if i not in held]
    plan = {
        "model_id": target.model_id if target else None,
        "spec": spec,
        "status": target.status if target else "new",
        "images": len(ids),
        "to_encode": len(todo),
        "skus": len({by_id[i].sku for i in todo}),
        "dry_run": dry_run,
        # the serving model's measured rate over the last hour; another model may be slower or faster
        "estimated_seconds": round(len(todo) / rate, 1) if rate else None,
        "measured_images_per_second": round(rate, 3) if rate else None,
    }
    if target is not None:
        plan["covered"] = len(held)
    if dry_run or not todo or target is None:
        if not dry_run:
            plan.update(queued=0, failed=0)
        if json_out:
            emit_json(plan)
        else:
            verb = "would encode" if dry_run else "encoding"
            eta = (
                f"~{plan['estimated_seconds']:.0f}s at the last hour's {rate:.2f} images/s"
                if rate and todo
                else "unknown (no recent throughput)"
            )
            console.print(
                f"{verb} {len(todo)} of {len(ids)} image(s) over {plan['skus']} SKU(s) with {spec} "
                f"({plan['status']} version {plan['model_id'] or '(new)'}); estimated time {eta}"
            )
        return True
    if target.status == VersionStatus.serving:
        raise ConfigError(f"{spec} is the serving model: re-index without --model")
    configure(settings)
    payloads = [PreprocessPayload(event=by_id[i].event("reindex"), models=[target.model_id], force=force) for i in todo]
    dispatcher().preprocess_many(payloads)
    if not json_out:
        console.print(f"building {target.model_id}: {len(payloads)} image(s) queued, {len(ids) - len(todo)} already held")
    if not wait:
        if json_out:
            emit_json({**plan, "queued": len(payloads)})
        return True
    covered, failed, deleted = follow_build(ledger, target.model_id, ids, timeout=timeout, show_progress=not json_out)
    if json_out:
        emit_json({**plan, "queued": len(payloads), "covered": covered, "failed": failed, "deleted": deleted})
    else:
        console.print(
            f"{target.model_id}: {covered}/{len(ids)} images hold a vector, {failed} failed, {deleted} deleted "
            f"meanwhile. Next: `imgsync cutover {target.model_id}`"
        )
    return covered + failed + deleted >= len(ids) and failed == 0


def _peek_version(ledger: Ledger, spec: str) -> VersionRow | None:
    """The version a build of ``spec`` would fill (a retired one is built again), without registering."""
    for v in ledger.versions((VersionStatus.serving, VersionStatus.standby, VersionStatus.building, VersionStatus.retired)):
        if _same_spec(v, spec):
            return v
    return None


def follow_build(
    ledger: Ledger, model_id: str, ids: Sequence[str], *, timeout: float | None, show_progress: bool
) -> tuple[int, int, int]:
    """Show the version's coverage of ``ids`` until each is covered, failed or deleted (or
    ``timeout``); returns ``(covered, failed, deleted)``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    progress = Progress(
        TextColumn("[bold]building[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not show_progress,
    )
    started, first = time.monotonic(), None
    covered = failed = deleted = 0
    with progress:
        task = progress.add_task("build", total=len(ids), failed=0, rate="")
        while True:
            covered = ledger.coverage(model_id, ids).covered
            rows = ledger.rows(ids)
            failed = sum(r.state == ImageState.failed for r in rows.values())
            deleted = len(ids) - len(rows) + sum(r.state == ImageState.deleted for r in rows.values())
            first = covered if first is None else first
            elapsed = time.monotonic() - started
            rate = f"{(covered - first) / elapsed:.1f} img/s" if elapsed > 1 and covered > first else ""
            progress.update(task, completed=covered + failed + deleted, failed=failed, rate=rate)
            if covered + failed + deleted >= len(ids) or (deadline is not None and time.monotonic() > deadline):
                return covered, failed, deleted
            time.sleep(POLL_SECONDS)


@handle_errors
def cutover(
    ctx: typer.Context,
    model_id: Annotated[str, typer.Argument(help="The version to serve: its model id, spec, or a unique prefix.")],
    force: Annotated[bool, typer.Option("--force", help="Cut over although the version does not hold every image yet, or `imgsync evaluate` found it worse on Recall@1.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Make a built model version serve search (both aliases move; the old version stands by). Shows
    the kept `imgsync evaluate` results of the serving and the target model side by side."""
    with _ledger_session(ctx) as (settings, ledger):
        _switch(settings, ledger, resolve_version(ledger, model_id), force=force, json_out=json_out, verb="cutover")


@handle_errors
def rollback(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Roll back although the standby version misses images.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Serve the version that served before the last cutover again."""
    with _ledger_session(ctx) as (settings, ledger):
        standby = ledger.versions((VersionStatus.standby,))
        if not standby:
            raise ConfigError("nothing to roll back to: no version stands by (no cutover happened yet, or it was retired)")
        _switch(settings, ledger, standby[0], force=force, json_out=json_out, verb="rollback")


@handle_errors
def retire(
    ctx: typer.Context,
    model_id: Annotated[str, typer.Argument(help="A version that does not serve: model id, spec, or a unique prefix.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Stop writing to a standby or building version (an abandoned build costs an encode per image).
    Its collections stay in Milvus until you drop them."""
    with _ledger_session(ctx) as (_, ledger):
        target = resolve_version(ledger, model_id)
        if target.status == VersionStatus.serving:
            raise ConfigError(f"{target.model_id} serves search: cut over to another version first")
        ledger.retire(target.model_id)
        _report({"action": "retire", "model_id": target.model_id, "was": target.status}, json_out, f"retired {target.model_id} (was {target.status})")


@contextmanager
def _ledger_session(ctx: typer.Context) -> Iterator[tuple[Settings, Ledger]]:
    """The command's settings and a ledger on a checked schema, disposed at the end."""
    settings = settings_from(ctx)
    ensure_schema(settings)
    ledger = Ledger(make_engine(settings.effective_database_url))
    try:
        yield settings, ledger
    finally:
        ledger.engine.dispose()


def _switch(settings: Settings, ledger: Ledger, target: VersionRow, *, force: bool, json_out: bool, verb: str) -> None:
    from worker.index.milvus_store import VersionNames, store_for

    before = ledger.serving_version()
    cov = ledger.coverage(target.model_id)
    doc = {
        "action": verb,
        "serving": before.model_id if before else None,  # what serves: the target once changed
        "target": target.model_id,
        "previous": before.model_id if before else None,
        "covered": cov.covered,
        "total": cov.total,
        "changed": False,
    }
    if before is not None and before.model_id == target.model_id:
        _report(doc, json_out, f"{target.model_id} already serves")
        return
    if target.status == VersionStatus.retired:
        raise ConfigError(f"{target.model_id} is retired (not kept in sync): build it again with `imgsync reindex --all --model {target.spec}`")
    if not json_out:
        console.print(f"{target.model_id}: holds {cov.covered}/{cov.total} indexed images ({cov.fraction:.1%})")
    if not cov.complete and not force:
        if json_out:
            emit_json(doc)
        else:
            err_console.print(
                f"[bold red]refused:[/] {target.model_id} is incomplete; finish it with "
                f"`imgsync reindex --all --model {target.spec}` or pass --force"
            )
        raise typer.Exit(EXIT_FAILURES)
    if verb == "cutover":
        _evaluation_gate(settings, ledger, before, target, doc, force=force, json_out=json_out)
    names = VersionNames(target.model_id, target.images_collection, target.skus_collection)
    with milvus_session(settings) as uri:
        store = store_for(settings, uri)
        try:
            store.ensure_version(target.model_id, target.dim)
            store.point_aliases(names)
        finally:
            store.close()
    ledger.set_serving(target.model_id)
    doc.update(changed=True, serving=target.model_id)
    missing = ledger.select(states=(ImageState.pending,))
    if not cov.complete and missing:
        from worker.sources.common import publish_events

        publish_events(settings, [r.event(verb) for r in missing])
        doc["requeued"] = len(missing)
    _report(doc, json_out, f"{verb}: {target.model_id} serves now (was {doc['previous']})")


def _evaluation_gate(
    settings: Settings, ledger: Ledger, before: VersionRow | None, target: VersionRow, doc: dict, *, force: bool,
    json_out: bool,
) -> None:
    """Show the kept evaluations (``imgsync evaluate``) of the serving model and the target; refuse a
    target worse on Recall@1 beyond the serving model's interval unless ``--force``."""
    from worker.evaluate import cutover_check

    text, worse = cutover_check(settings, ledger, before.model_id if before else None, target.model_id)
    if text is None:
        return
    doc.update(evaluation=text, worse_recall_at_1=worse)
    if not json_out:
        console.print(plain(text))
    if not worse:
        return
    if force:
        err_console.print(f"[bold yellow]warning:[/] {target.model_id} is worse on Recall@1; cutting over (--force)", highlight=False)
        return
    if json_out:
        emit_json(doc)
    err_console.print(
        f"[bold red]refused:[/] {target.model_id} is worse on Recall@1 than the serving model on the same "
        "sample; pass --force to cut over anyway",
        highlight=False,
    )
    raise typer.Exit(EXIT_FAILURES)


def _report(doc: dict, json_out: bool, text: str) -> None:
    if json_out:
        emit_json(doc)
    else:
        console.print(text)
