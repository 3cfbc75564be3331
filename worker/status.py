"""``imgsync status``: the facts an operator checks first, gathered without failing on the first error."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from config.settings import Settings
from schemas.outputs import StatusOutput, VersionInfo, WorkerInfo
from worker.heartbeat import STALE_AFTER_SECONDS
from worker.index import running_server_uri
from worker.index.milvus_store import store_for
from worker.ledger import Ledger, make_engine
from worker.search import serving_model_id

__all__ = ["collect_status", "queue_depths", "version_infos", "RATE_WINDOW_SECONDS"]

#: window of the indexing rate in status
RATE_WINDOW_SECONDS = 300


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting per queue, read from the broker (touches no Celery app state)."""
    from kombu import Connection

    if settings.embedded_broker:
        settings.home.mkdir(parents=True, exist_ok=True)
    out: dict[str, int | None] = {}
    with Connection(settings.effective_broker_url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1, timeout=5)
        channel = conn.default_channel
        for q in settings.queues.all():
            try:
                out[q] = int(channel.queue_declare(queue=q, passive=True).message_count)
            except Exception:  # noqa: BLE001 - a queue never declared yet holds nothing
                out[q] = 0
    return out


#: free space under IMGSYNC_HOME below which status and ``index --wait`` warn (embedded writers stop
#: at zero: SQLite answers "database or disk is full", Milvus Lite's WAL and the pixel store ENOSPC)
LOW_DISK_BYTES = 64 * 2**20


def disk_problem(settings: Settings, low: int | None = None) -> str | None:
    """A line naming IMGSYNC_HOME when the embedded stack keeps data there (broker, state database,
    pixel store or Milvus Lite) and its filesystem has less than ``low`` (:data:`LOW_DISK_BYTES`)
    bytes free; else None."""
    low = LOW_DISK_BYTES if low is None else low
    used = (
        settings.embedded_broker
        or not settings.database_url
        or not settings.milvus_uri
        or settings.effective_pixel_store == str(settings.pixel_dir)
    )
    if not used:
        return None
    where = Path(settings.home).expanduser().resolve()
    probe = where
    while not probe.exists() and probe != probe.parent:  # not made yet: the filesystem it will be on
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None
    if free >= low:
        return None
    return (
        f"IMGSYNC_HOME ({where}) has {free / 2**20:.1f} MiB free: the embedded broker, state database, "
        "pixel store and Milvus Lite cannot write once it is full. Free space there: the redrive sends "
        "the images left waiting again at its first look after that (IMGSYNC_REDRIVE_INTERVAL_SECONDS)"
    )


def collect_status(settings: Settings) -> StatusOutput:
    errors: list[str] = []
    if (disk := disk_problem(settings)) is not None:
        errors.append(disk)
    ledger_counts: dict[str, int] = {}
    failures: dict[str, int] = {}
    live: list[dict] = []
    dead = 0
    recent = 0
    oldest: float | None = None
    stalled = 0
    aliases: dict[str, str] = {}
    skus = dirty = 0
    versions: list[VersionInfo] = []
    db_ok = broker_ok = milvus_ok = False
    ledger = Ledger(make_engine(settings.effective_database_url))
    try:
        ledger_counts = ledger.counts()
        skus, dirty = ledger.sku_counts()
        failures = ledger.failure_counts()
        dead = ledger.dead_letter_count()
        live = ledger.live_workers(STALE_AFTER_SECONDS)
        recent = ledger.indexed_since(datetime.now(UTC) - timedelta(seconds=RATE_WINDOW_SECONDS))
        versions = version_infos(ledger)
        oldest = ledger.oldest_waiting_seconds()
        stalled = ledger.stalled_count(datetime.now(UTC) - timedelta(seconds=settings.effective_redrive_after))
        db_ok = True
    except Exception as exc:  # noqa: BLE001
        errors.append(f"database (IMGSYNC_DATABASE_URL): {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    queues: dict[str, int | None] = {q: None for q in settings.queues.all()}
    try:
        queues = queue_depths(settings)
        broker_ok = True
    except Exception as exc:  # noqa: BLE001
        errors.append(f"broker (IMGSYNC_BROKER_URL): {exc}")
    uri = settings.milvus_uri or running_server_uri(settings.milvus_data_dir)
    model_id = None
    if uri:
        store = store_for(settings, uri, timeout=5)
        try:
            model_id = serving_model_id(ledger, store) if db_ok else None
            aliases = store.alias_targets()
            milvus_ok = store.ping()
            if not milvus_ok:
                errors.append(f"Milvus (IMGSYNC_MILVUS_URI) does not answer at {uri}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"Milvus (IMGSYNC_MILVUS_URI) at {uri}: {exc}")
        finally:
            store.close()
    else:
        errors.append("Milvus: IMGSYNC_MILVUS_URI is empty and no embedded server runs (start `imgsync up`)")
    ledger.engine.dispose()
    return StatusOutput(
        ready=db_ok and broker_ok and milvus_ok,
        milvus_uri=uri or "",
        model_id=model_id,
        configured_model=settings.model,
        broker_url=_safe(settings.effective_broker_url),
        database_url=_safe(settings.effective_database_url),
        queues=queues,
        ledger=ledger_counts,
        skus=skus,
        dirty_skus=dirty,
        failures_by_reason=failures,
        dead_letters=dead,
        waiting_oldest_seconds=None if oldest is None else round(oldest, 1),
        stalled=stalled,
        workers=[WorkerInfo(**w) for w in live],
        indexed_last_5m=recent,
        indexed_per_second_5m=round(recent / RATE_WINDOW_SECONDS, 3),
        aliases=aliases,
        versions=versions,
        errors=errors,
    )


def version_infos(ledger: Ledger) -> list[VersionInfo]:
    """Active model versions with their coverage, serving first."""
    out = []
    for v in ledger.versions():
        cov = ledger.coverage(v.model_id)
        out.append(
            VersionInfo(
                model_id=v.model_id,
                spec=v.spec,
                status=v.status,
                dim=v.dim,
                covered=cov.covered,
                total=cov.total,
                images_collection=v.images_collection,
                skus_collection=v.skus_collection,
            )
        )
    return out


def _safe(url: str) -> str:
    """``url`` with its password shown as ``***``; each URL of a ``;``-separated failover list too."""
    from urllib.parse import urlsplit, urlunsplit

    if ";" in url:
        return ";".join(_safe(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
