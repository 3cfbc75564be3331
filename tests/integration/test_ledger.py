"""The ledger on real SQLite and PostgreSQL: ordering, idempotence, SKU dirty marks, migrations."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from schemas.events import Action, ImageEvent
from schemas.reasons import Reason
from worker.ledger import IndexedImage, Ledger, make_engine, upgrade
from worker.ledger.db import current_revision


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade(url)
    led = Ledger(make_engine(url))
    if request.param == "postgresql":  # the session database is shared: start empty
        with led.engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE images, skus, index_versions, workers, dead_letters"))
    yield led
    led.engine.dispose()


def ev(uri: str = "s3://b/SKU-1/a.jpg", sku: str = "SKU-1", version: int = 10, action: Action = Action.upsert) -> ImageEvent:
    return ImageEvent(uri=uri, sku=sku, version=version, action=action)


def indexed(e: ImageEvent, h: str = "h1") -> IndexedImage:
    return IndexedImage(e.image_id, e.version, h, "model-a", "req")


def test_accept_orders_by_version(ledger: Ledger) -> None:
    """A newer event is current; an older one is stale and changes nothing but its request's outcome."""
    new = ev(version=20)
    assert ledger.accept(new, "r-new").current
    stale = ev(version=10)
    acc = ledger.accept(stale, "r-old")
    assert not acc.current and acc.previous is not None
    row = ledger.get(new.image_id)
    assert row is not None and row.version == new.version and row.state == "pending"
    assert row.request_id == "r-old" and row.outcome == "unchanged"


def test_indexed_marks_sku_dirty_and_refresh_cleans(ledger: Ledger) -> None:
    """mark_indexed records the vector and dirties the SKU; finish_sku at that generation cleans it."""
    e = ev()
    ledger.accept(e, "r")
    recorded, dirty = ledger.mark_indexed([indexed(e)])
    assert recorded == [e.image_id] and dirty == {"SKU-1"}
    gen, clean = ledger.sku_generation("SKU-1")
    assert gen > clean
    assert ledger.sku_members("SKU-1") == [e.image_id]
    assert ledger.finish_sku("SKU-1", gen, 1, "model-a") is False
    assert ledger.sku_counts() == (1, 0)


def test_refresh_detects_concurrent_change(ledger: Ledger) -> None:
    """A refresh computed from an old generation reports that it must recompute."""
    a, b = ev("s3://b/SKU-1/a.jpg"), ev("s3://b/SKU-1/b.jpg")
    ledger.accept(a)
    ledger.mark_indexed([indexed(a)])
    gen, _ = ledger.sku_generation("SKU-1")
    ledger.accept(b)
    ledger.mark_indexed([indexed(b)])  # arrives while the refresh of `gen` runs
    assert ledger.finish_sku("SKU-1", gen, 1, "model-a") is True
    assert ledger.sku_counts()[1] == 1


def test_overtaken_version_is_not_marked_indexed(ledger: Ledger) -> None:
    """An encode result for an old version is not recorded once a newer event arrived."""
    old = ev(version=10)
    ledger.accept(old)
    ledger.accept(ev(version=11))
    recorded, dirty = ledger.mark_indexed([indexed(old)])
    assert recorded == [] and dirty == set()


def test_delete_then_stale_upsert_does_not_revive(ledger: Ledger) -> None:
    """A delete wins over an older upsert that arrives after it."""
    up = ev(version=10)
    ledger.accept(up)
    ledger.mark_indexed([indexed(up)])
    delete = ev(version=12, action=Action.delete)
    assert ledger.accept(delete).current
    assert ledger.mark_deleted(delete.image_id, delete.version) == "SKU-1"
    assert not ledger.accept(ev(version=11)).current
    row = ledger.get(up.image_id)
    assert row is not None and row.state == "deleted"
    assert ledger.sku_members("SKU-1") == []


def test_sku_change_dirties_old_sku(ledger: Ledger) -> None:
    """An image moving to another SKU leaves the old SKU's membership at once."""
    e = ev(sku="OLD", version=1)
    ledger.accept(e)
    ledger.mark_indexed([indexed(e)])
    ledger.finish_sku("OLD", ledger.sku_generation("OLD")[0], 1, "m")
    ledger.accept(ev(sku="NEW", version=2))
    assert ledger.sku_members("OLD") == []
    gen, clean = ledger.sku_generation("OLD")
    assert gen > clean


def test_failure_and_attempts(ledger: Ledger) -> None:
    """Transient attempts are counted; a permanent failure is recorded with its reason."""
    e = ev()
    ledger.accept(e, "r")
    assert ledger.note_attempt(e.image_id, e.version, Reason.fetch_error, "boom") == 1
    assert ledger.note_attempt(e.image_id, e.version, Reason.fetch_error, "boom") == 2
    assert ledger.mark_failed(e.image_id, e.version, Reason.corrupt, "bad bytes", "r")
    row = ledger.get(e.image_id)
    assert row is not None and (row.state, row.reason, row.outcome) == ("failed", "corrupt", "failed")
    assert ledger.counts()["failed"] == 1


def test_version_registry(ledger: Ledger) -> None:
    """Index versions are recorded once and found by collection name."""
    ledger.record_version("model-a", "imgsync_images__a", "imgsync_skus__a", 64)
    ledger.record_version("model-a", "imgsync_images__a", "imgsync_skus__a", 64)
    assert ledger.model_for_collection("imgsync_images__a") == "model-a"
    assert ledger.model_for_collection("nope") is None


def _mark_many(url: str, sku: str, n: int) -> None:
    led = Ledger(make_engine(url))
    for _ in range(n):
        led.mark_dirty([sku])
    led.engine.dispose()


def test_concurrent_writers_on_sqlite(tmp_path: Path) -> None:
    """Several processes writing one SQLite ledger neither lock up nor lose increments."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    upgrade(url)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_mark_many, args=(url, "S", 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert Ledger(make_engine(url)).sku_generation("S")[0] == 150


def test_migration_up_down_up(tmp_path: Path) -> None:
    """The alembic migration applies, reverts and applies again."""
    from alembic import command

    from worker.ledger.db import _alembic_config

    url = f"sqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}"
    assert upgrade(url) == "0003"
    command.downgrade(_alembic_config(url), "base")
    assert current_revision(url) is None
    assert upgrade(url) == "0003"


def test_worker_heartbeats(ledger: Ledger) -> None:
    """Heartbeats record live worker nodes; stale ones drop out; a stopped node forgets itself."""
    ledger.heartbeat("h:1", host="h", pid=1, queues="encode", model="tiny")
    ledger.heartbeat("h:1", host="h", pid=1, queues="encode", model="tiny")
    ledger.heartbeat("h:2", host="h", pid=2, queues="preprocess,sku", model="tiny")
    assert [w["name"] for w in ledger.live_workers(60)] == ["h:1", "h:2"]
    ledger.forget_worker("h:2")
    assert [w["name"] for w in ledger.live_workers(60)] == ["h:1"]
    assert ledger.live_workers(-1) == []  # everything is older than "the future"
