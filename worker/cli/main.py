"""The ``imgsync`` command line (typer + rich). Exit codes: 0 success, 1 the command ran and found or
produced failures, 2 usage or configuration error, 3 a required service is unreachable."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from config.settings import Settings
from schemas.outputs import SearchHit, SearchOutput, StatusOutput
from worker.cli.common import (
    EXIT_FAILURES,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    State,
    check_broker,
    console,
    emit_json,
    ensure_schema,
    err_console,
    handle_errors,
    milvus_session,
    plain,
    settings_from,
    sku_option,
)
from worker.cli.evaluate import evaluate
from worker.cli.failures import failures_app
from worker.cli.reindex import reindex
from worker.cli.sources import sources_app
from worker.cli.versions import cutover, resolve_version, retire, rollback
from worker.encoders.hub import check_weights_available
from worker.encoders.spec import parse_spec
from worker.errors import ConfigError, ServiceUnavailable

__all__ = ["app", "main"]

app = typer.Typer(
    name="imgsync",
    help="Keep a Milvus vector index in sync with a product catalog's images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="State database (ledger) schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(failures_app, name="failures")
app.add_typer(sources_app, name="sources")
app.command("reindex")(reindex)
app.command("cutover")(cutover)
app.command("evaluate")(evaluate)
app.command("rollback")(rollback)
app.command("retire")(retire)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    state = State()
    state.debug = debug
    ctx.obj = state
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pymilvus logs each failed call with its traceback on a stderr handler of its own (a hundred
    # lines when a server goes away); imgsync reports the failure itself, --debug shows them
    logging.getLogger("pymilvus").setLevel(logging.WARNING if debug else logging.CRITICAL)


# --- db ----------------------------------------------------------------------------------------


@db_app.command("upgrade")
@handle_errors
def db_upgrade(
    ctx: typer.Context,
    skip_catalog: Annotated[
        bool, typer.Option("--skip-catalog", help="Leave IMGSYNC_CATALOG_URL alone (a catalog with tables of its own).")
    ] = False,
) -> None:
    """Create or upgrade the state database schema and the reference catalog schema (alembic)."""
    from worker.ledger.db import upgrade
    from worker.sources.catalog_db import upgrade_catalog

    settings = settings_from(ctx)
    rev = upgrade(settings.effective_database_url)
    err_console.print(f"state database at revision [bold]{rev}[/]")
    if skip_catalog:
        return
    catalog_rev = upgrade_catalog(settings.effective_catalog_url)
    err_console.print(f"catalog schema at revision [bold]{catalog_rev}[/]")


# --- worker / up -------------------------------------------------------------------------------


def check_model_setting(settings: Settings) -> None:
    """Refuse at once, before a stack starts, what its encode worker would refuse only after: a spec
    that cannot load, CUDA asked for where there is none, pretrained weights neither cached nor
    downloadable.

    Raises:
        ConfigError: naming IMGSYNC_MODEL or IMGSYNC_DEVICE.
    """
    from worker.encoders import create_encoder

    create_encoder(settings.encoder).precheck()
    if settings.device.strip().lower() not in ("auto", "cpu"):  # torch is imported only to check CUDA
        from worker.encoders.device import resolve_device

        resolve_device(settings.device)
    check_weights_available(settings.model)


def role_settings(settings: Settings, queues: list[str]) -> Settings:
    """The settings a worker of ``queues`` runs with. A worker that does not encode builds its models
    on the CPU: it needs only their preprocessing and identity, and its prefork children must not
    each take a CUDA context and a copy of the weights on the GPU.

    Raises:
        ConfigError: the encode queue shares a prefork worker with CPU queues on a CUDA device (a
            CUDA context does not survive the fork).
    """
    if settings.queues.encode not in queues:
        return settings.model_copy(update={"device": "cpu"})
    if settings.jpeg_decode == "encoder" or queues != [settings.queues.encode]:
        from worker.encoders.device import resolve_device

        device = resolve_device(settings.device)
        if settings.jpeg_decode == "encoder" and device.type != "cuda":
            logging.getLogger("imgsync").warning(
                "IMGSYNC_JPEG_DECODE=encoder on a %s encode worker: JPEGs are decoded at full size in this one "
                "process, slower than the preprocess workers do it; it pays off on CUDA only",
                device,
            )
        if queues != [settings.queues.encode] and device.type == "cuda":
            raise ConfigError(
                f"IMGSYNC_DEVICE={settings.device} is a GPU: run the encode queue in a worker of its own "
                f"(imgsync worker --queues {settings.queues.encode}) and the CPU queues in another "
                f"(--queues {settings.queues.preprocess},{settings.queues.sku}); a CUDA context does not "
                "survive the prefork pool's fork"
            )
    return settings


@app.command()
@handle_errors
def worker(
    ctx: typer.Context,
    queues: Annotated[str, typer.Option(help="Comma-separated queues: preprocess, encode, sku.")] = "",
    concurrency: Annotated[int, typer.Option(min=0, help="Prefork processes (CPU queues). 0: from settings.")] = 0,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run a Celery worker. The encode queue gets one process (one model per device) with micro-batching;
    CPU queues get a prefork pool."""
    from worker import __version__
    from worker.celery_app import configure, runtime
    from worker.heartbeat import Heartbeat
    from worker.ledger import Ledger, make_engine
    from worker.metrics import declare_worker_series, metrics
    from worker.pixels import open_pixel_store

    try:
        logging.getLogger().setLevel(loglevel.upper())
    except ValueError as exc:
        raise ConfigError(f"--loglevel: {exc}; one of DEBUG, INFO, WARNING, ERROR, CRITICAL") from exc
    settings = settings_from(ctx)
    known = settings.queues.all()
    chosen = [q.strip() for q in (queues or ",".join(known)).split(",") if q.strip()]
    unknown = [q for q in chosen if q not in known]
    if unknown or not chosen:
        raise ConfigError(f"--queues: {'unknown queue(s) ' + ', '.join(unknown) if unknown else 'no queue named'}; valid: {', '.join(known)}")
    settings = role_settings(settings, chosen)
    ensure_schema(settings)
    if settings.queues.encode in chosen or settings.queues.preprocess in chosen:
        check_weights_available(settings.model)  # never fall back silently, never retry for minutes
    _start_metrics(settings, node=f"worker-{os.getpid()}")
    metrics().build_info.labels(__version__, settings.model).set(1)
    app_ = configure(settings)
    encode_only = chosen == [settings.queues.encode]
    swept = open_pixel_store(settings.effective_pixel_store, settings.pixel_ttl_seconds).sweep()  # stale entries
    if swept:
        logging.getLogger("imgsync").info("removed %d expired pixel entries", swept)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    stages = [stage for stage, queue in (("preprocess", settings.queues.preprocess), ("encode", settings.queues.encode),
                                         ("sku", settings.queues.sku)) if queue in chosen]  # fmt: skip
    model_ids: list[str] = []
    if settings.queues.encode in chosen:
        rt = runtime()
        rt.encoder.warmup()  # fail fast on a bad model, before taking any message
        rt.names()  # and on an unreachable Milvus (registers the first serving version)
        model_ids = [v.model_id for v in rt.active_versions()]
        if not encode_only:
            rt.reset_after_fork()
    declare_worker_series(stages, model_ids)
    heartbeat = Heartbeat(Ledger(make_engine(settings.effective_database_url)), queues=",".join(chosen), model=settings.model)
    argv = ["worker", "-Q", ",".join(chosen), "--loglevel", loglevel, "-n", f"imgsync-{'-'.join(chosen)}-{os.getpid()}@%h"]
    if encode_only:
        from worker.health import BackPressure
        from worker.metrics.gpu_gauges import GpuGauges

        app_.steps["consumer"].add(BackPressure)  # stop consuming while Milvus or the device is down
        app_.steps["consumer"].add(GpuGauges)  # an idle GPU reads idle, not its last busy batch
        # solo pool: the model lives in this process; prefetch enough for a full batch to form
        argv += ["--pool", "solo", "--prefetch-multiplier", str(max(4, settings.batch_max * 2))]
    else:
        conc = concurrency or settings.worker_concurrency or (os.cpu_count() or 1)
        argv += ["--pool", "prefork", "--concurrency", str(conc)]
        # imported once here, inherited by every prefork child instead of imported by each (≈1 s of
        # CPU per child); no gRPC channel is opened before the fork
        import pymilvus  # noqa: F401
    heartbeat.start()
    redrive = None
    if settings.queues.preprocess in chosen and settings.redrive_interval_seconds > 0:
        from worker.celery_app import dispatcher
        from worker.heartbeat import STALE_AFTER_SECONDS
        from worker.redrive import Redrive, RedriveThread

        ledger = Ledger(make_engine(settings.effective_database_url))  # its own pool, disposed after each look
        redrive = RedriveThread(
            Redrive(settings, ledger, dispatcher()), heartbeat.name, settings.redrive_interval_seconds, STALE_AFTER_SECONDS
        ).start()
    try:
        app_.worker_main(argv)
    finally:
        if redrive is not None:
            redrive.stop()
        heartbeat.stop()


def _start_metrics(settings, *, node: str) -> None:  # type: ignore[no-untyped-def]
    """Multiprocess metrics for this node (before any pool forks) and, with a port, its exporter.

    A node started by `up` writes into the directory `up` serves (IMGSYNC_METRICS_DIR) and exports
    nothing itself; a standalone node gets a fresh directory and its own exporter."""
    from worker.metrics import enable_multiprocess, start_exporter
    from worker.metrics.collectors import StateCollector

    if settings.metrics_dir is not None:
        enable_multiprocess(settings.metrics_dir, wipe=False)
    else:
        enable_multiprocess(settings.home / "metrics" / node, wipe=True)
    if settings.metrics_port:
        start_exporter(settings.metrics_port, extra=[StateCollector(settings)])


@app.command()
@handle_errors
def up(ctx: typer.Context) -> None:
    """Run the embedded stack in the foreground (Milvus Lite server, workers, folder source, metrics)
    until Ctrl-C."""
    import threading

    from worker.cli.stack import EmbeddedStack
    from worker.sources.folder import FolderSource

    settings = settings_from(ctx)
    ensure_schema(settings)  # the embedded state is upgraded; a database of its own only checked (`db upgrade`)
    check_model_setting(settings)
    check_broker(settings)  # its workers would wait for it for ever under a ready banner
    if settings.metrics_port:
        from worker.metrics import check_metrics_port

        check_metrics_port(settings.metrics_port)  # before the stack starts, not after
    stack = EmbeddedStack(settings)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # Ctrl-C and SIGTERM both stop it, also where SIGINT was inherited as ignored (a background job
    # of a script: Python installs no KeyboardInterrupt handler then)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    uri = stack.start()
    if settings.metrics_port:  # one exporter for every stack process's samples
        from worker.metrics import enable_multiprocess, start_exporter
        from worker.metrics.collectors import StateCollector

        enable_multiprocess(stack.metrics_dir, wipe=False)
        try:
            start_exporter(settings.metrics_port, extra=[StateCollector(settings)])
        except ConfigError:
            stack.stop()
            raise
    metrics_at = f"http://127.0.0.1:{settings.metrics_port}/metrics" if settings.metrics_port else "off"
    folder_stop = threading.Event()
    folder = threading.Thread(
        target=FolderSource(settings).run, args=(folder_stop,), name="imgsync-folder", daemon=True
    )
    folder.start()
    if parse_spec(settings.model).backend in ("tiny", "random"):  # said where the operator looks, not only in a log
        err_console.print(
            f"[bold yellow]model {settings.model} has RANDOM WEIGHTS: vectors are for tests, search results "
            "are not meaningful[/] (set IMGSYNC_MODEL to a pretrained model, e.g. open_clip:ViT-B-32@openai)"
        )
    console.print(
        f"[bold green]imgsync up[/]: Milvus {uri}, model {settings.model}, data {settings.home}, "
        f"watching {settings.effective_watch_folder}, metrics {metrics_at}, logs {stack.log_dir}. Ctrl-C stops."
    )
    disk_said: str | None = None  # the free-space warning last shown, so that it shows once per episode
    disk_looked = 0.0
    try:
        while not stopping:
            if time.monotonic() - disk_looked > DISK_LOOK_SECONDS:
                disk_looked = time.monotonic()
                disk_said = _say_disk(settings, disk_said)
            gone = stack.exited()
            if gone:
                err_console.print(f"[bold red]a stack process ended: {'; '.join(gone)}[/]", highlight=False)
                _exit_as_worker(stack)
                raise typer.Exit(EXIT_FAILURES)
            if not folder.is_alive():
                err_console.print("[bold red]the folder source stopped (see the log above)[/]")
                raise typer.Exit(EXIT_FAILURES)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping: workers finish their batches, Milvus is flushed …")
        folder_stop.set()
        folder.join(10)
        stack.stop()


# --- index -------------------------------------------------------------------------------------


@app.command()
@handle_errors
def index(
    ctx: typer.Context,
    targets: Annotated[list[str], typer.Argument(help="Files, folders (<sku>/<image>), s3:// or http(s):// URIs.")],
    sku: Annotated[str | None, typer.Option(help="SKU for all given images (default: the parent folder).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the images to their outcome.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Re-encode even unchanged images.")] = False,
    timeout: Annotated[float | None, typer.Option(min=0, help="With --wait: give up after this many seconds.")] = None,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Folders: also delete from the index the images under them whose files are gone (outcome 'deleted').",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Enqueue images for indexing; with --wait print one result per image (exit 1 if any failed or is
    still pending when --timeout runs out)."""
    from worker.cli.indexing import collect_events, pruned_events, submit_and_report

    settings = settings_from(ctx)
    ensure_schema(settings)
    events = collect_events(targets, sku_option(sku), missing_ok=prune)
    if prune:
        events += pruned_events(settings, targets, {e.image_id for e in events})
    if not events and prune:  # already pruned, and nothing left to index: nothing to do
        from schemas.outputs import IndexOutput

        if json_out:
            emit_json(IndexOutput(results=[], queued=0))
        else:
            console.print(f"nothing to index or prune under {', '.join(targets)}", markup=False)
        return
    if not events:
        raise ConfigError(f"no images found in {', '.join(targets)}")
    if not submit_and_report(settings, events, force=force, wait=wait, timeout=timeout, json_out=json_out):
        raise typer.Exit(EXIT_FAILURES)


# --- search ------------------------------------------------------------------------------------


@app.command()
@handle_errors
def search(
    ctx: typer.Context,
    image: Annotated[Path | None, typer.Option(help="Query image file.")] = None,
    text: Annotated[str | None, typer.Option(help="Query text (models with a text tower).")] = None,
    skus: Annotated[bool, typer.Option("--skus", help="Search SKU aggregate vectors instead of images.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Number of hits.")] = 10,
    json_out: JsonOpt = False,
) -> None:
    """Nearest images (or SKUs) to a query image or text; score is cosine similarity."""
    from worker.search import run_search

    if (image is None) == (text is None):
        raise ConfigError("give exactly one of --image FILE or --text TEXT")
    settings = settings_from(ctx)
    ensure_schema(settings)
    with milvus_session(settings) as uri:
        hits = run_search(settings, uri, image=image, text=text, skus=skus, limit=limit)
    if json_out:
        emit_json(SearchOutput(hits=hits))
        return
    print_hits(hits, skus=skus)


def print_hits(hits: list[SearchHit], *, skus: bool, title: str = "search results") -> None:
    table = Table("#", "score", "sku", *(() if skus else ("uri",)), title=title)
    for i, h in enumerate(hits, 1):
        table.add_row(str(i), f"{h.score:.4f}", plain(h.sku), *(() if skus else (plain(h.uri),)))
    console.print(table)


# --- verify ------------------------------------------------------------------------------------


@app.command()
@handle_errors
def verify(
    ctx: typer.Context,
    repair: Annotated[bool, typer.Option("--repair", help="Enqueue exactly the fixes for what is found.")] = False,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Check a standby or building version instead (model id, spec or unique prefix)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare the ledger with Milvus: missing vectors, orphans, stale provenance, SKU vectors that are not
    the mean of their images, in the serving version (or --model's). Exit 1 when there are problems."""
    from schemas.outputs import VerifyOutput
    from worker import verify as verifying
    from worker.celery_app import configure, dispatcher
    from worker.index.milvus_store import store_for
    from worker.ledger import Ledger, VersionStatus, make_engine

    settings = settings_from(ctx)
    ensure_schema(settings)
    ledger = Ledger(make_engine(settings.effective_database_url))
    with milvus_session(settings) as uri:
        store = store_for(settings, uri)
        try:
            target = resolve_version(ledger, model) if model is not None else None
            if target is not None and target.status == VersionStatus.retired:
                raise ConfigError(
                    f"{target.model_id} is retired: it is no longer kept in sync "
                    "(`imgsync reindex --all --model` builds it again)"
                )
            if target is not None and target.status == VersionStatus.serving:
                target = None  # the serving version: the full check
            report = verifying.verify(ledger, store) if target is None else verifying.verify_version(ledger, store, target)
            repaired = None
            if repair and report.problems:
                configure(settings)
                repaired = verifying.repair(report, ledger, store, dispatcher())
        finally:
            store.close()
    doc = VerifyOutput(
        problems=report.problems, missing=report.missing, orphans=report.orphans, stale=report.stale,
        sku_mismatch=report.sku_mismatch, model_id=report.model_id, repaired=repaired,
        status=report.version.status if report.version is not None else None, uncovered=report.uncovered,
        collections_missing=report.collections_missing,
    )  # fmt: skip
    if json_out:
        emit_json(doc)
    else:
        title = f"verify ({doc.model_id or 'nothing serving'}{f', {doc.status}' if doc.status else ''})"
        table = Table("kind", "count", "sample", title=title)
        for kind in ("missing", "orphans", "stale", "sku_mismatch"):
            items = getattr(doc, kind)
            table.add_row(kind, str(len(items)), plain(", ".join(items[:5])))
        console.print(table)
        if doc.collections_missing:
            console.print(f"Milvus lost {', '.join(doc.collections_missing)}: read as empty"
                          + ("; made again by the repair" if repaired else " (--repair makes it again)"), markup=False)
        if doc.uncovered:
            console.print(f"{doc.uncovered} indexed image(s) not yet held by this version (a cutover or rollback re-queues them)")
        if repaired:
            console.print("repair enqueued: " + ", ".join(f"{k}={v}" for k, v in repaired.items()))
    if doc.problems:
        raise typer.Exit(EXIT_FAILURES)


# --- status ------------------------------------------------------------------------------------


@app.command()
@handle_errors
def status(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Is the stack answering; serving model; queue depths; ledger counts by state."""
    from worker.status import collect_status

    settings = settings_from(ctx)
    schema_problem = None  # a reachable database without imgsync's schema: a setup step missing (exit 2)
    if not settings.database_url:
        try:
            ensure_schema(settings)  # embedded SQLite state: create it rather than report a missing table
        except ServiceUnavailable:
            pass  # it cannot be written (a full disk): collect_status reports what answers and what does not
    else:
        try:
            ensure_schema(settings)
        except ConfigError as exc:
            schema_problem = str(exc)
        except ServiceUnavailable:
            pass  # reported by collect_status as not ready (exit 3)
    doc: StatusOutput = collect_status(settings)
    if schema_problem:
        doc.errors.insert(0, schema_problem)
        doc.ready = False
    if json_out:
        emit_json(doc)
    else:
        table = Table("", "", title="imgsync status", show_header=False)
        table.add_row("ready", "[green]yes[/]" if doc.ready else "[red]no[/]")
        table.add_row("milvus", plain(doc.milvus_uri))
        table.add_row("serving model", plain(doc.model_id or "—"))
        table.add_row("configured model", plain(doc.configured_model))
        table.add_row("queues", ", ".join(f"{k}={'?' if v is None else v}" for k, v in doc.queues.items()))
        table.add_row("images", ", ".join(f"{k}={v}" for k, v in doc.ledger.items()))
        table.add_row("skus", f"{doc.skus} ({doc.dirty_skus} awaiting refresh)")
        if doc.waiting_oldest_seconds is not None:
            stalled = f"; [yellow]{doc.stalled} stalled[/] (sent again once the queues are empty)" if doc.stalled else ""
            table.add_row("oldest waiting", f"{doc.waiting_oldest_seconds:.0f} s{stalled}")
        table.add_row("workers", plain(", ".join(f"{w.name} [{w.queues}]" for w in doc.workers) or "none seen"))
        table.add_row("indexed, last 5 min", f"{doc.indexed_last_5m} ({doc.indexed_per_second_5m:.2f}/s)")
        table.add_row("failures", ", ".join(f"{k}={v}" for k, v in sorted(doc.failures_by_reason.items())) or "none")
        table.add_row("aliases", plain(", ".join(f"{k} → {v}" for k, v in doc.aliases.items()) or "—"))
        for v in doc.versions:
            table.add_row(f"version ({v.status})", plain(f"{v.model_id}: {v.covered}/{v.total} images, dim {v.dim}"))
        for e in doc.errors:
            table.add_row("[red]error[/]", plain(e))
        console.print(table)
    if not doc.ready:
        raise typer.Exit(EXIT_USAGE if schema_problem else EXIT_UNREACHABLE)


def _exit_as_worker(stack) -> None:  # type: ignore[no-untyped-def]
    """A worker that ended with exit status 2 (configuration) or 3 (a service unreachable): the same
    status and its message."""
    found = stack.worker_error()
    if found is None:
        return
    code, problem = found
    if code == EXIT_USAGE:
        raise ConfigError(problem)
    err_console.print(Text.assemble(("error:", "bold red"), " ", problem), highlight=False)
    raise typer.Exit(EXIT_UNREACHABLE)


#: how often `up` looks at the free space under IMGSYNC_HOME
DISK_LOOK_SECONDS = 10.0


def _say_disk(settings: Settings, said: str | None) -> str | None:
    """Warn (once) when IMGSYNC_HOME's disk runs (nearly) full, say when it has room again; what
    stands said now."""
    from worker.status import disk_problem

    problem = disk_problem(settings)
    if problem is not None and said is None:
        err_console.print(Text.assemble(("warning:", "bold yellow"), " ", problem), highlight=False)
    elif problem is None and said is not None:
        err_console.print(Text.assemble(("disk:", "bold green"), f" IMGSYNC_HOME ({settings.home}) has room again"))
    return problem


# --- demo --------------------------------------------------------------------------------------


@app.command()
@handle_errors
def demo(
    ctx: typer.Context,
    images: Annotated[int, typer.Option(min=1, max=100_000, help="Images in the synthetic catalog.")] = 200,
    skus: Annotated[int, typer.Option(min=1, max=10_000, help="SKUs in the synthetic catalog.")] = 50,
    timeout: Annotated[float, typer.Option(min=0, help="Give up waiting after this many seconds.")] = 1800,
) -> None:
    """Make a synthetic catalog, start the embedded stack, index it, show a search."""
    import random

    from worker.cli.demo import choose_demo_model, make_catalog
    from worker.cli.indexing import collect_events, print_results, publish, wait_for
    from worker.cli.stack import EmbeddedStack
    from worker.encoders import create_encoder
    from worker.search import run_search
    from worker.sources.folder import FolderSource

    def _interrupt(*_: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the demo as Ctrl-C does: the stack is stopped, not orphaned

    signal.signal(signal.SIGTERM, _interrupt)
    settings = settings_from(ctx)
    settings, notice = choose_demo_model(settings)
    if notice:
        err_console.print(f"[bold yellow]note:[/] {notice}", highlight=False)
    check_model_setting(settings)
    ensure_schema(settings)
    root = settings.home / "demo-catalog"
    with console.status(f"writing {images} product photos over {min(skus, images)} SKUs to {root} …"):
        files, queries = make_catalog(root, images, min(skus, images))
    console.print(f"catalog: {len(files)} images in {root}")
    with console.status("starting the embedded stack (Milvus Lite server, workers) …"):
        stack = EmbeddedStack(settings)
        uri = stack.start()

    def stopped() -> str | None:
        ended = stack.exited()
        return "a stack process ended: " + "; ".join(ended) if ended else None

    try:
        # an earlier, larger demo's photos are gone from the folder: take them out of the index too
        folder = FolderSource(settings, root)
        gone = list(folder.gone_under(folder.root))
        folder.ledger.engine.dispose()
        if gone:
            removed = wait_for(settings, gone, publish(settings, gone), timeout=timeout, show_progress=False, give_up=stopped)
            left = sum(r.outcome == "pending" for r in removed)
            console.print(
                f"removed {len(gone) - left} photos of an earlier, larger demo from the index"
                + (f"; {left} still wait to be removed" if left else "")
            )
        events = collect_events([str(root)], None)
        request_id = publish(settings, events)
        results = wait_for(settings, events, request_id, timeout=timeout, label="indexing", give_up=stopped)
        _exit_as_worker(stack)
        print_results(results)
        sku = random.Random(1).choice(sorted(queries))
        query = queries[sku]
        encoder = create_encoder(settings.encoder)
        hits = run_search(settings, uri, image=query, text=None, skus=False, limit=5, encoder=encoder)
        print_hits(hits, skus=False, title=f"images nearest to a new photo of {sku} ({query.name})")
        sku_hits = run_search(settings, uri, image=query, text=None, skus=True, limit=3, encoder=encoder)
        print_hits(sku_hits, skus=True, title="nearest SKUs")
    finally:
        with console.status("stopping the stack …"):
            stack.stop()
    model_env = f"IMGSYNC_MODEL={settings.model} " if notice else ""  # the fallback model: the default's weights are not here
    console.print(
        f"done. Data stays in {settings.home}: `{model_env}imgsync up` serves it again, "
        "`imgsync search --image FILE` queries it.",
        markup=False,
        soft_wrap=True,
    )
    if any(r.outcome in ("failed", "pending") for r in results):
        raise typer.Exit(EXIT_FAILURES)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
