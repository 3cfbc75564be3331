"""The ledger on real SQLite and PostgreSQL: ordering, idempotence, SKU dirty marks, migrations."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from schemas.events import Action, ImageEvent
from schemas.reasons import Reason
from tests.helpers import empty_ledger
from worker.ledger import Coverage, IndexedImage, KnownImage, Ledger, VersionStatus, make_engine, upgrade
from worker.ledger.db import current_revision


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    led = empty_ledger(url)
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


def test_accept_many_records_what_accept_would_in_one_call(ledger: Ledger) -> None:
    """A publisher's batch: new images pending, a stale event answered and left out, a delete, an
    image moving SKU (its old SKU dirty and returned), one image twice (the newer event wins);
    the worker accepting the same event again afterwards is still current."""
    moving = ev("s3://b/SKU-1/m.jpg", version=10)
    ledger.accept(moving, "r0")
    ledger.mark_indexed([indexed(moving)])
    newer = ev("s3://b/SKU-1/n.jpg", version=30)
    ledger.accept(newer, "r0")
    fresh = ev("s3://b/SKU-1/f.jpg", version=10)
    gone = ev("s3://b/SKU-1/g.jpg", version=10, action=Action.delete)
    stale = ev("s3://b/SKU-1/n.jpg", version=20)
    moved = ImageEvent(uri=moving.uri, sku="SKU-2", version=11)
    twice_old, twice_new = ev("s3://b/SKU-1/t.jpg", version=10), ev("s3://b/SKU-1/t.jpg", version=12)

    got = ledger.accept_many([fresh, gone, stale, moved, twice_new, twice_old], "r1")

    assert [e.uri for e in got.current] == [fresh.uri, gone.uri, moved.uri, twice_new.uri]
    assert got.left_skus == ["SKU-1"]
    rows = ledger.rows([fresh.image_id, gone.image_id, newer.image_id, moving.image_id, twice_new.image_id])
    assert (rows[fresh.image_id].state, rows[fresh.image_id].outcome, rows[fresh.image_id].request_id) == ("pending", None, "r1")
    assert rows[gone.image_id].state == "deleted" and rows[gone.image_id].event().action is Action.delete
    assert (rows[newer.image_id].version, rows[newer.image_id].outcome) == (newer.version, "unchanged")
    assert (rows[moving.image_id].sku, rows[moving.image_id].state) == ("SKU-2", "pending")
    assert rows[twice_new.image_id].version == twice_new.version
    gen, clean = ledger.sku_generation("SKU-1")
    assert gen > clean  # the SKU the image left waits for its refresh
    # the worker's own accept of the same event: current, and nothing to refresh again
    again = ledger.accept(moved, "r1")
    assert again.current and again.left_sku is None
    assert ledger.accept_many([], "r2").current == []


def test_indexing_rate_is_measured_over_the_time_indexing_ran(ledger: Ledger) -> None:
    """Three images indexed over 20 s, 40 minutes ago: 0.15 images/s (not 3 per hour)."""
    from datetime import UTC, datetime, timedelta

    from worker.ledger.tables import images

    now = datetime.now(UTC)
    assert ledger.indexing_rate(now - timedelta(hours=1)) is None
    events = [ev(f"s3://b/SKU-1/{i}.jpg") for i in range(3)]
    for e in events:
        ledger.accept(e, "r")
    ledger.mark_indexed([indexed(e) for e in events])
    start = now - timedelta(minutes=40)
    with ledger.engine.begin() as conn:
        for i, e in enumerate(events):
            conn.execute(images.update().where(images.c.image_id == e.image_id).values(indexed_at=start + timedelta(seconds=10 * i)))
    assert ledger.indexing_rate(now - timedelta(hours=1)) == pytest.approx(3 / 20)
    assert ledger.indexing_rate(start + timedelta(seconds=15)) == pytest.approx(1.0)  # one image: a second's worth
    assert ledger.indexing_rate(now - timedelta(minutes=5)) is None


def test_the_workers_accept_of_a_recorded_event_writes_nothing(ledger: Ledger) -> None:
    """After the publisher's accept_many, the worker's accept of the same event is current and
    leaves the row as it is (no write, no write lock); another request, or an event already
    finished, is accepted as before."""
    e = ev("s3://b/SKU-1/w.jpg")
    ledger.accept_many([e], "r1")
    before = ledger.get(e.image_id)
    got = ledger.accept(e, "r1")
    assert got.current and got.previous == before and ledger.get(e.image_id) == before
    again = ledger.accept(e, "r2")  # the same image in another request: that request is recorded
    assert again.current and ledger.get(e.image_id).request_id == "r2"
    ledger.mark_indexed([indexed(e)])
    ledger.mark_unchanged(e.image_id, e.version, "r2")
    finished = ledger.get(e.image_id)
    assert ledger.accept(e, "r2").current  # a duplicate of a finished event: waits again, as before
    assert ledger.get(e.image_id).outcome is None and finished.outcome == "unchanged"


def test_known_images_reads_what_the_per_image_reads_do(ledger: Ledger) -> None:
    """Rows and held vectors of many images in one read (600 ids: two chunks of the IN list) equal
    get() and vector_rows() one by one; an image not recorded has no row and holds nothing. accept()
    given a known row that records the event answers from it with no statement; given one that does
    not (a newer event came), it reads and decides as without it."""
    events = [ev(f"s3://b/SKU-1/{i}.jpg", version=10) for i in range(600)]
    ledger.accept_many(events, "r")
    ledger.mark_indexed([indexed(e, h=f"h{i}") for i, e in enumerate(events[:3])])
    missing = ev("s3://b/SKU-1/none.jpg")
    known = ledger.known_images([missing.image_id, *[e.image_id for e in events], events[0].image_id])
    assert len(known) == 601 and known[missing.image_id] == KnownImage(None, {})
    for e in [*events[:5], events[599]]:
        assert known[e.image_id] == KnownImage(ledger.get(e.image_id), ledger.vector_rows(e.image_id))
    assert known[events[0].image_id].held == {"model-a": ("h0", "SKU-1")} and known[events[4].image_id].held == {}

    fresh = events[4]
    row = known[fresh.image_id].row
    statements: list[tuple[str, bool]] = []  # (statement, executemany: one execution per row)
    sa.event.listen(ledger.engine, "before_cursor_execute", lambda *a: statements.append((a[2], a[5])))
    got = ledger.accept(fresh, "r", row)
    assert got.current and got.previous == row and statements == []  # answered from the known row
    newer = ev(fresh.uri, version=20)
    ledger.accept(newer, "r2")
    statements.clear()
    stale = ledger.accept(fresh, "r", ledger.get(fresh.image_id))  # a row that holds another event
    assert not stale.current and len(statements) >= 2 and ledger.get(fresh.image_id).version == newer.version


def test_indexed_marks_sku_dirty_and_refresh_cleans(ledger: Ledger) -> None:
    """mark_indexed records the vector and dirties the SKU; finish_sku at that generation cleans it."""
    e = ev()
    ledger.accept(e, "r")
    recorded, dirty = ledger.mark_indexed([indexed(e)])
    assert recorded == [e.image_id] and dirty == {"SKU-1"}
    gen, clean = ledger.sku_generation("SKU-1")
    assert gen > clean
    assert ledger.sku_members("SKU-1", "model-a") == [e.image_id]
    assert ledger.finish_sku("SKU-1", gen, 1, "model-a") is False
    assert ledger.sku_counts() == (1, 0)


def test_mark_indexed_records_a_large_batch_with_a_repeat_in_few_statements(ledger: Ledger) -> None:
    """1,200 images over 150 SKUs, one of them twice in the batch (a message delivered twice): every
    image is recorded once (a multi-row upsert must not repeat a key: PostgreSQL refuses that),
    indexed with its own content hash, every SKU dirtied once per call. On PostgreSQL that is one
    statement per table (over arrays), not one execution per row."""
    events = [ev(f"s3://b/S{i % 150}/{i}.jpg", sku=f"S{i % 150}") for i in range(1200)]
    ledger.accept_many(events, "r")
    gens = {f"S{k}": ledger.sku_generation(f"S{k}")[0] for k in range(150)}
    statements: list[tuple[str, bool]] = []  # (statement, executemany: one execution per row)
    sa.event.listen(ledger.engine, "before_cursor_execute", lambda *a: statements.append((a[2], a[5])))
    items = [indexed(e, h=f"h{i}") for i, e in enumerate(events)] + [indexed(events[7], h="h7")]
    recorded, dirty = ledger.mark_indexed(items)
    assert sorted(set(recorded)) == sorted(e.image_id for e in events) and dirty == set(gens)
    rows = ledger.rows([e.image_id for e in events])
    assert all(rows[e.image_id].state == "indexed" and rows[e.image_id].content_hash == f"h{i}" for i, e in enumerate(events))
    assert all(ledger.sku_generation(sku)[0] == gen + 1 for sku, gen in gens.items())
    assert ledger.sku_members("S7", "model-a") == sorted(e.image_id for e in events if e.sku == "S7")
    writes = [(s, many) for s, many in statements if s.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    if ledger.engine.dialect.name == "postgresql":  # SQLite's image updates run per row, in-process
        assert len(writes) == 3 and not any(many for _, many in writes), writes  # one per table, over arrays


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
    assert ledger.sku_members("SKU-1", "model-a") == []


def test_sku_change_dirties_old_sku(ledger: Ledger) -> None:
    """An image moving to another SKU leaves the old SKU's membership at once."""
    e = ev(sku="OLD", version=1)
    ledger.accept(e)
    ledger.mark_indexed([indexed(e)])
    ledger.finish_sku("OLD", ledger.sku_generation("OLD")[0], 1, "m")
    ledger.accept(ev(sku="NEW", version=2))
    assert ledger.sku_members("OLD", "model-a") == []
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
    """The first version serves; later ones build; registering twice changes nothing."""
    row = ledger.register_version("model-b", "timm:x", "imgsync_images__b", "imgsync_skus__b", 8, serve_if_first=True)
    assert row.status == VersionStatus.building and row.spec == "timm:x" and row.dim == 8
    again = ledger.register_version("model-b", "timm:x", "imgsync_images__b", "imgsync_skus__b", 8, serve_if_first=True)
    assert again.status == VersionStatus.building
    assert [v.model_id for v in ledger.versions()] == ["model-a", "model-b"]  # serving first
    assert ledger.model_for_collection("imgsync_images__b") == "model-b"
    assert ledger.model_for_collection("nope") is None


def test_cutover_and_rollback_statuses(ledger: Ledger) -> None:
    """Cutover: the target serves, the old serving stands by; a third cutover retires the standby;
    rollback (cutover back to the standby) swaps them."""
    ledger.register_version("model-b", "b", "ib", "sb", 8, serve_if_first=False)
    ledger.register_version("model-c", "c", "ic", "sc", 8, serve_if_first=False)
    before = ledger.set_serving("model-b")
    assert before is not None and before.model_id == "model-a"
    status = {v.model_id: v.status for v in ledger.versions(("serving", "standby", "building", "retired"))}
    assert status == {"model-b": "serving", "model-a": "standby", "model-c": "building"}
    ledger.set_serving("model-c")
    status = {v.model_id: v.status for v in ledger.versions(("serving", "standby", "building", "retired"))}
    assert status == {"model-c": "serving", "model-b": "standby", "model-a": "retired"}
    ledger.set_serving("model-b")  # rollback
    status = {v.model_id: v.status for v in ledger.versions(("serving", "standby", "building", "retired"))}
    assert status == {"model-b": "serving", "model-c": "standby", "model-a": "retired"}
    # a retired version registered again is built again (its vectors are not trusted as current)
    assert ledger.register_version("model-a", "a", "ia", "sa", 8, serve_if_first=False).status == "building"


def test_vectors_per_version_coverage_and_cutover_state(ledger: Ledger) -> None:
    """Each version remembers its own vectors; coverage counts indexed images whose current content
    a version holds; a cutover leaves uncovered images pending, and SKU members follow the version."""
    ledger.register_version("model-b", "b", "ib", "sb", 8, serve_if_first=False)
    a, b = ev("s3://b/SKU-1/a.jpg"), ev("s3://b/SKU-1/b.jpg")
    for e in (a, b):
        ledger.accept(e, "r")
    ledger.mark_indexed([indexed(a), indexed(b)])
    assert ledger.coverage("model-a") == Coverage("model-a", 2, 2)
    assert ledger.coverage("model-b") == Coverage("model-b", 0, 2)
    ledger.mark_indexed([IndexedImage(a.image_id, a.version, "h1", "model-b", "req")])
    assert ledger.coverage("model-b").covered == 1
    assert ledger.coverage("model-b", [a.image_id]).complete
    assert ledger.vector_rows(a.image_id) == {"model-a": ("h1", "SKU-1"), "model-b": ("h1", "SKU-1")}
    assert ledger.sku_members("SKU-1", "model-a") == sorted([a.image_id, b.image_id])
    assert ledger.sku_members("SKU-1", "model-b") == [a.image_id]
    # a vector of older content does not count
    ledger.mark_indexed([IndexedImage(b.image_id, b.version, "stale", "model-b", "req")])
    assert ledger.coverage("model-b").covered == 1
    ledger.set_serving("model-b")
    rows = ledger.rows([a.image_id, b.image_id])
    assert rows[a.image_id].state == "indexed" and rows[a.image_id].model_id == "model-b"
    assert rows[b.image_id].state == "pending"
    # a delete forgets the image in every version
    d = ev("s3://b/SKU-1/a.jpg", version=30, action=Action.delete)
    ledger.accept(d, "r")
    ledger.mark_deleted(d.image_id, d.version)
    assert ledger.vector_rows(a.image_id) == {}


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


def test_sqlite_reads_never_wait_for_a_writer(tmp_path: Path) -> None:
    """While another process holds SQLite's write lock, ledger reads answer at once (WAL readers take
    no lock) and ledger writes wait for it, then go through."""
    import sqlite3
    import threading

    path = tmp_path / "state.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    led = Ledger(make_engine(url))
    led.register_version("model-a", "tiny", "imgsync_images__a", "imgsync_skus__a", 64, serve_if_first=True)
    led.accept(ev("s3://b/SKU-1/r.jpg"))
    other = sqlite3.connect(path, isolation_level=None)  # another process's writer, in effect
    other.execute("BEGIN IMMEDIATE")
    try:
        reads: dict[str, object] = {}
        reader = threading.Thread(
            target=lambda: reads.update(
                row=led.get(ev("s3://b/SKU-1/r.jpg").image_id), counts=led.counts(), serving=led.serving_version()
            )
        )  # fmt: skip
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "a read waited for the write lock"
        assert reads["row"] is not None and reads["serving"] is not None
        writer = threading.Thread(target=led.mark_dirty, args=(["S-LOCK"],))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive()  # the write waits for the lock ...
    finally:
        other.execute("COMMIT")
        other.close()
    writer.join(10)
    assert not writer.is_alive()  # ... and goes through once it is free
    assert led.sku_generation("S-LOCK")[0] == 1
    led.engine.dispose()


def test_sqlite_write_lock_wait_gives_up_after_its_timeout(tmp_path: Path) -> None:
    import sqlite3

    from worker.ledger.db import begin_immediate

    path = tmp_path / "lock.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")
    waiter = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(waiter, timeout_ms=200)
    holder.execute("COMMIT")
    begin_immediate(waiter, timeout_ms=200)  # free now: taken at once
    waiter.execute("COMMIT")
    assert waiter.execute("PRAGMA busy_timeout").fetchone()[0] > 0  # the connection's own timeout is back


def test_migration_up_down_up(tmp_path: Path) -> None:
    """The alembic migration applies, reverts and applies again."""
    from alembic import command

    from worker.ledger.db import _alembic_config

    url = f"sqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}"
    assert upgrade(url) == "0006"
    command.downgrade(_alembic_config(url), "base")
    assert current_revision(url) is None
    assert upgrade(url) == "0006"


def test_migration_0004_keeps_what_was_indexed(tmp_path: Path) -> None:
    """An index built before versions had a status: its newest version serves after the upgrade (older
    ones retire) and the vectors its images hold are known per version."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    assert upgrade(url, "0003") == "0003"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO index_versions (model_id, images_collection, skus_collection, dim, created_at) "
            "VALUES ('old', 'i_old', 's_old', 4, '2026-01-01'), ('new', 'i_new', 's_new', 4, '2026-02-01')"
        ))
        conn.execute(sa.text(
            "INSERT INTO images (image_id, uri, sku, state, content_hash, model_id, version, attempts, created_at, "
            "updated_at, indexed_at) VALUES ('i1', 's3://b/S/1.jpg', 'S', 'indexed', 'h', 'new', '1', 0, "
            "'2026-02-02', '2026-02-02', '2026-02-02'), ('i2', 's3://b/S/2.jpg', 'S', 'failed', NULL, NULL, '1', 0, "
            "'2026-02-02', '2026-02-02', NULL)"
        ))
    engine.dispose()
    assert upgrade(url) == "0006"
    led = Ledger(make_engine(url))
    assert led.serving_version().model_id == "new"
    assert [v.model_id for v in led.versions()] == ["new"]  # older versions were not kept in sync
    assert led.version("old").status == "retired"
    assert led.vector_rows("i1") == {"new": ("h", "S")} and led.vector_rows("i2") == {}
    assert led.sku_members("S", "new") == ["i1"]
    led.engine.dispose()


def test_worker_heartbeats(ledger: Ledger) -> None:
    """Heartbeats record live worker nodes; stale ones drop out; a stopped node forgets itself."""
    ledger.heartbeat("h:1", host="h", pid=1, queues="encode", model="tiny")
    ledger.heartbeat("h:1", host="h", pid=1, queues="encode", model="tiny")
    ledger.heartbeat("h:2", host="h", pid=2, queues="preprocess,sku", model="tiny")
    assert [w["name"] for w in ledger.live_workers(60)] == ["h:1", "h:2"]
    ledger.forget_worker("h:2")
    assert [w["name"] for w in ledger.live_workers(60)] == ["h:1"]
    assert ledger.live_workers(-1) == []  # everything is older than "the future"


def test_a_bucket_indexed_by_hand_still_takes_its_events(ledger: Ledger, tmp_path: Path) -> None:
    """`imgsync index s3://…` (a backfill) stamps an object with the ledger's version, or the lowest
    one for an object never seen, never a clock time: the bucket's later events (S3 sequencers) stay
    newer, so an upload or delete after the backfill is taken, not dropped as stale."""
    from schemas.events import normalize_version
    from worker.cli.indexing import in_bucket_order

    by_hand = [ImageEvent(uri="s3://b/SKU-1/a.jpg", sku="SKU-1", source="cli"),
               ImageEvent(uri=str(tmp_path / "SKU-1" / "x.jpg"), sku="SKU-1", source="cli")]  # fmt: skip
    stamped = in_bucket_order(ledger, by_hand)
    assert stamped[0].version == normalize_version(0) and stamped[1] == by_hand[1]  # a file keeps its clock
    assert ledger.accept_many(stamped).current == stamped

    deleted = ImageEvent(uri="s3://b/SKU-1/a.jpg", sku="SKU-1", action=Action.delete, version="0055AED6DCD90281E5")
    assert ledger.accept_many([deleted]).current == [deleted]  # the bucket's delete is not stale
    again = in_bucket_order(ledger, by_hand[:1])  # indexed by hand again: the ledger's version, re-read
    assert again[0].version == deleted.version and ledger.accept_many(again).current == again
    upload = ImageEvent(uri="s3://b/SKU-1/a.jpg", sku="SKU-1", version="0055AED6DCD90281F0")
    assert ledger.accept_many([upload]).current == [upload]
    old = ImageEvent(uri="s3://b/SKU-1/a.jpg", sku="SKU-1", version="0055AED6DCD90281E0")
    assert ledger.accept_many([old]).current == []  # sequencer order still holds


# --- lock order on PostgreSQL: writers that cross on rows wait, never deadlock -------------------


@pytest.fixture
def pg_ledger(pg_url: str) -> Ledger:
    led = empty_ledger(pg_url)
    yield led
    led.engine.dispose()


def test_accept_many_marks_the_skus_images_left_in_key_order(pg_ledger: Ledger) -> None:
    """Two images leave SKU-B and SKU-A (events in that order) while another transaction holds SKU-A's
    row and then takes SKU-B's, in the key order every writer uses. accept_many takes SKU-A first and
    waits; it used to take SKU-B first (event order), and the other transaction then deadlocked
    against it (PostgreSQL aborts one side)."""
    import threading
    import time

    from worker.ledger.tables import skus

    ledger = pg_ledger
    from_b, from_a = ev("s3://b/x/1.jpg", sku="SKU-B"), ev("s3://b/x/2.jpg", sku="SKU-A")
    ledger.accept_many([from_b, from_a], "r0")
    ledger.mark_indexed([indexed(from_b), indexed(from_a)])  # both SKU rows exist now
    moves = [ev(from_b.uri, sku="SKU-C", version=20), ev(from_a.uri, sku="SKU-C", version=20)]
    got: list[object] = []

    with ledger.engine.connect() as other:
        tx = other.begin()
        other.execute(sa.select(skus.c.sku).where(skus.c.sku == "SKU-A").with_for_update())
        t = threading.Thread(target=lambda: got.append(_catch(lambda: ledger.accept_many(moves, "r1"))))
        t.start()
        time.sleep(1.0)  # accept_many now waits for SKU-A (or, in event order, holds SKU-B)
        other.execute(sa.update(skus).where(skus.c.sku == "SKU-B").values(updated_at=sa.func.now()))
        tx.commit()
        t.join(30)
    assert not t.is_alive() and len(got) == 1 and not isinstance(got[0], Exception), got
    assert got[0].left_skus == ["SKU-A", "SKU-B"]  # type: ignore[attr-defined]
    assert {s for s in ledger.dirty_skus()} >= {"SKU-A", "SKU-B"}


def test_the_redrive_touch_skips_rows_an_encode_holds(pg_ledger: Ledger) -> None:
    """An image held by an encode's claim is being worked on: the redrive's touch skips it at once (no
    wait, no crossing of the claim's id order) and takes the other stalled images and SKUs."""
    from datetime import UTC, datetime, timedelta

    from worker.ledger.tables import images, skus

    ledger = pg_ledger
    held, free = ev("s3://b/SKU-1/held.jpg"), ev("s3://b/SKU-1/free.jpg")
    ledger.accept_many([held, free], "r0")
    ledger.mark_dirty(["SKU-1"])
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with ledger.engine.begin() as conn:
        conn.execute(images.update().values(updated_at=hour_ago))
        conn.execute(skus.update().values(updated_at=hour_ago))
    import threading

    claim = ledger.claim([held.image_id])
    got: list[object] = []
    t = threading.Thread(
        target=lambda: got.append(
            _catch(lambda: ledger.touch_stalled([free.image_id, held.image_id], ["SKU-1"], hour_ago + timedelta(minutes=1)))
        )
    )
    t.start()
    t.join(10)  # it used to wait for the claim (an UPDATE over the held row)
    claim.release()
    t.join(30)
    assert got == [([free.image_id], ["SKU-1"])], got
    assert ledger.get(held.image_id).updated_at.replace(tzinfo=UTC) == hour_ago  # type: ignore[union-attr]
    # released: the next look takes it
    assert ledger.touch_stalled([held.image_id], [], hour_ago + timedelta(minutes=1))[0] == [held.image_id]


def _catch(fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the test reports it
        return exc


def test_a_uri_prefix_scope_is_case_exact(ledger: Ledger) -> None:
    """SQLite's LIKE ignores ASCII case: a prefix scope (reindex --prefix, index --prune, the folder
    source's rescan) took "Cat/" images for "cat/" ones."""
    lower, upper = ev("file:///x/cat/S1/a.jpg", sku="S1"), ev("file:///x/Cat/S9/a.jpg", sku="S9")
    ledger.accept_many([lower, upper], "r")
    assert [r.uri for r in ledger.select(uri_prefix="file:///x/cat/")] == [lower.uri]
    assert [r.uri for r in ledger.select(uri_prefix="file:///x/Cat/")] == [upper.uri]
    assert sorted(r.uri for r in ledger.select(uri_prefix="file:///x/")) == sorted([lower.uri, upper.uri])
