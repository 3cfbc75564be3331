"""The catalog outbox: schema and triggers (PostgreSQL and SQLite), the relay against real databases,
and end to end on the production stack (Redis, PostgreSQL, worker processes, Milvus Lite server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from schemas.events import Action, CropBox, image_id_for, normalize_uri
from worker.ledger import Ledger, make_engine, upgrade
from worker.ledger.db import current_revision
from worker.sources.catalog_db import (
    VERSION_TABLE,
    catalog_revision,
    outbox,
    upgrade_catalog,
)
from worker.sources.outbox import OutboxRelay

CATALOG_TABLES = {"products", "product_images", "catalog_outbox", "catalog_clock", VERSION_TABLE}


# --- helpers -------------------------------------------------------------------------------------


class Catalog:
    """Writes to the catalog tables as a store application would (plain SQL, own transactions)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def sql(self, statement: str, **params: object) -> list:
        with self.engine.begin() as conn:
            res = conn.execute(sa.text(statement), params)
            return res.all() if res.returns_rows else []

    def product(self, sku: str) -> int:
        return self.sql("INSERT INTO products (sku) VALUES (:sku) RETURNING id", sku=sku)[0][0]

    def image(self, product_id: int, uri: str, crop: tuple | None = None) -> int:
        x, y, w, h = crop or (None, None, None, None)
        return self.sql(
            "INSERT INTO product_images (product_id, uri, crop_x, crop_y, crop_w, crop_h) "
            "VALUES (:p, :u, :x, :y, :w, :h) RETURNING id",
            p=product_id, u=uri, x=x, y=y, w=w, h=h,
        )[0][0]

    def unprocessed(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(outbox).where(outbox.c.processed_at.is_(None))).scalar_one()

    def tables(self) -> set[str]:
        return set(sa.inspect(self.engine).get_table_names())


class Recorder:
    """A publish function that keeps the events (and can be told to fail, or to be slow)."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.fail: Exception | None = None
        self.delay = 0.0
        self.lock = threading.Lock()

    def __call__(self, settings, events) -> str:
        if self.fail is not None:
            raise self.fail
        time.sleep(self.delay)
        with self.lock:
            self.batches.append(list(events))
        return "test"

    def take(self) -> dict[str, object]:
        """The events published since the last call, by uri (each uri at most once per batch)."""
        with self.lock:
            out = {}
            for batch in self.batches:
                assert len({e.uri for e in batch}) == len(batch), "one event per uri per batch"
                out.update({e.uri: e for e in batch})
            self.batches.clear()
        return out


@pytest.fixture(params=["sqlite", "postgresql"])
def setup(request: pytest.FixtureRequest, make_settings, pg_database):
    """Settings, catalog writer and relay: SQLite catalog inside the state DB (embedded default), or
    a PostgreSQL catalog next to a SQLite state DB."""
    if request.param == "sqlite":
        settings = make_settings()
    else:
        settings = make_settings(catalog_url=pg_database())
    upgrade(settings.effective_database_url)
    upgrade_catalog(settings.effective_catalog_url)
    rec = Recorder()
    relay = OutboxRelay(settings, publish=rec)
    yield settings, Catalog(settings.effective_catalog_url), relay, rec
    relay.close()


def uri(name: str) -> str:
    return f"s3://bucket/{name}.jpg"


def _one_image_relayed(settings, sku: str):  # type: ignore[no-untyped-def]
    """Schemas up, product ``sku`` with image ``uri("a")`` relayed already:
    ``(catalog, recorder, relay, product id, image row id)``."""
    upgrade(settings.effective_database_url)
    upgrade_catalog(settings.effective_catalog_url)
    cat, rec = Catalog(settings.effective_catalog_url), Recorder()
    relay = OutboxRelay(settings, publish=rec)
    p = cat.product(sku)
    a = cat.image(p, uri("a"))
    relay.drain()
    rec.take()
    return cat, rec, relay, p, a


# --- schema --------------------------------------------------------------------------------------


def test_catalog_schema_is_its_own_branch(tmp_path: Path, pg_database) -> None:
    """A catalog in its own database (PostgreSQL or SQLite file) gets only catalog tables; upgrading
    is idempotent; sharing the state database keeps both version tables apart."""
    for url in (pg_database(), f"sqlite:///{tmp_path / 'catalog.db'}"):
        assert upgrade_catalog(url) == "c0001"
        assert upgrade_catalog(url) == "c0001"
        assert catalog_revision(url) == "c0001"
        assert Catalog(url).tables() == CATALOG_TABLES
        assert current_revision(url) is None  # the state history is untouched
    shared = f"sqlite:///{tmp_path / 'state.db'}"
    state_rev = upgrade(shared)
    assert upgrade_catalog(shared) == "c0001"
    assert current_revision(shared) == state_rev and state_rev
    assert CATALOG_TABLES | {"images", "alembic_version"} <= Catalog(shared).tables()


def test_catalog_with_tables_of_its_own_is_refused_until_stamped(tmp_path: Path) -> None:
    """A database that already has a `products` table is not migrated over (exit-2 error naming
    the setting); once stamped with the catalog revision, upgrading leaves it alone."""
    from worker.errors import ConfigError

    url = f"sqlite:///{tmp_path / 'shop.db'}"
    shop = Catalog(url)
    shop.sql("CREATE TABLE products (code TEXT PRIMARY KEY)")
    with pytest.raises(ConfigError, match="IMGSYNC_CATALOG_URL"):
        upgrade_catalog(url)
    assert shop.tables() == {"products"}
    shop.sql(f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY)")
    shop.sql(f"INSERT INTO {VERSION_TABLE} VALUES ('c0001')")
    assert upgrade_catalog(url) == "c0001"
    assert shop.tables() == {"products", VERSION_TABLE}


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_catalog_upgrades_at_once(backend: str, pg_database, tmp_path: Path) -> None:
    """Relays starting together (processes) upgrade a fresh catalog once, without errors
    (PostgreSQL: advisory lock; SQLite: the write lock)."""
    url = pg_database() if backend == "postgresql" else f"sqlite:///{tmp_path / 'catalog.db'}"
    code = f"from worker.sources.catalog_db import upgrade_catalog; print(upgrade_catalog({url!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["c0001"] * 3


# --- relay behaviour, on both databases ----------------------------------------------------------


def test_catalog_changes_become_events(setup) -> None:
    """Inserts, uri/SKU/crop changes, soft and hard deletes and an undelete give the right events,
    one per uri, with versions that increase and compare with time.time_ns()."""
    _, cat, relay, rec = setup
    before = time.time_ns()
    p1, p2 = cat.product("SKU-1"), cat.product("SKU-2")
    a = cat.image(p1, uri("a"), crop=(0.1, 0.2, 0.5, 0.6))
    b = cat.image(p1, uri("b"))
    c = cat.image(p2, uri("c"))
    assert relay.drain().rows == 5
    got = rec.take()
    assert set(got) == {uri("a"), uri("b"), uri("c")}
    assert {e.action for e in got.values()} == {Action.upsert}
    assert got[uri("a")].sku == "SKU-1" and got[uri("a")].crop == CropBox(x=0.1, y=0.2, w=0.5, h=0.6)
    assert got[uri("b")].crop is None and got[uri("c")].sku == "SKU-2"
    assert all(e.source == "outbox" and int(e.version, 16) >= before for e in got.values())
    last = max(int(e.version, 16) for e in got.values())
    assert relay.drain().rows == 0 and rec.take() == {}

    def step(sql: str, **params: object) -> dict:
        nonlocal last
        cat.sql(sql, **params)
        relay.drain()
        events = rec.take()
        for e in events.values():
            assert int(e.version, 16) > last, "versions only grow"
        if events:
            last = max(int(e.version, 16) for e in events.values())
        return {u: (str(e.action), e.sku) for u, e in events.items()}

    assert step("UPDATE product_images SET position = 7 WHERE id = :i", i=a) == {}  # not indexed: no event
    assert step("UPDATE products SET name = 'renamed' WHERE id = :p", p=p1) == {}
    assert step("UPDATE product_images SET uri = :u WHERE id = :i", u=uri("b2"), i=b) == {
        uri("b"): ("delete", "SKU-1"), uri("b2"): ("upsert", "SKU-1")}
    assert step("UPDATE products SET sku = 'SKU-1X' WHERE id = :p", p=p1) == {
        uri("a"): ("upsert", "SKU-1X"), uri("b2"): ("upsert", "SKU-1X")}
    cat.sql("UPDATE product_images SET crop_x = NULL, crop_y = NULL, crop_w = NULL, crop_h = NULL WHERE id = :i", i=a)
    relay.drain()
    assert rec.take()[uri("a")].crop is None
    assert step("UPDATE product_images SET deleted_at = CURRENT_TIMESTAMP WHERE id = :i", i=a) == {
        uri("a"): ("delete", "SKU-1X")}
    assert step("UPDATE products SET deleted_at = CURRENT_TIMESTAMP WHERE id = :p", p=p1) == {
        uri("a"): ("delete", "SKU-1X"), uri("b2"): ("delete", "SKU-1X")}
    assert step("UPDATE products SET deleted_at = NULL WHERE id = :p", p=p1) == {
        uri("a"): ("delete", "SKU-1X"), uri("b2"): ("upsert", "SKU-1X")}  # image a stays soft-deleted
    assert step("UPDATE product_images SET product_id = :p WHERE id = :i", p=p1, i=c) == {uri("c"): ("upsert", "SKU-1X")}
    assert step("DELETE FROM products WHERE id = :p", p=p1) == {
        uri("a"): ("delete", "SKU-1X"), uri("b2"): ("delete", "SKU-1X"), uri("c"): ("delete", "SKU-1X")}
    assert cat.sql("SELECT count(*) FROM product_images")[0][0] == 0
    assert cat.unprocessed() == 0


def test_shared_uri_follows_the_live_row(setup) -> None:
    """A uri in two products: deleting one row keeps it indexed under the other product's SKU."""
    _, cat, relay, rec = setup
    p1, p2 = cat.product("SKU-1"), cat.product("SKU-2")
    cat.image(p1, uri("shared"))
    relay.drain()
    rec.take()
    i2 = cat.image(p2, uri("shared"))
    cat.sql("DELETE FROM products WHERE id = :p", p=p1)
    relay.drain()
    got = rec.take()
    assert (got[uri("shared")].action, got[uri("shared")].sku) == (Action.upsert, "SKU-2")
    cat.sql("DELETE FROM product_images WHERE id = :i", i=i2)
    relay.drain()
    got = rec.take()
    assert (got[uri("shared")].action, got[uri("shared")].sku) == (Action.delete, "SKU-2")


def test_invalid_rows_are_dead_lettered_once(setup) -> None:
    """A bad uri or crop box becomes a dead letter (reason invalid_event) and its row is processed;
    the valid images of the same batch are published; nothing is retried."""
    settings, cat, relay, rec = setup
    p = cat.product("SKU-1")
    cat.image(p, "ftp://host/x.jpg")
    cat.image(p, uri("outside"), crop=(0.6, 0.0, 0.5, 1.0))
    cat.sql("INSERT INTO product_images (product_id, uri, crop_x) VALUES (:p, :u, 0.1)", p=p, u=uri("partial"))
    relative = cat.image(p, "cdn.example.com/img/a.jpg")  # no scheme: it named a file under the relay's cwd
    cat.image(p, uri("good"))
    stats = relay.drain()
    assert stats.dead_letters == 4 and stats.upserts == 1
    assert set(rec.take()) == {uri("good")}
    assert cat.unprocessed() == 0
    letters = Ledger(make_engine(settings.effective_database_url)).dead_letter_rows()
    assert len(letters) == 4
    assert {d["task"] for d in letters} == {"sources.outbox"} and {d["reason"] for d in letters} == {"invalid_event"}
    bodies = " ".join(d["body"] for d in letters)
    assert "ftp://host/x.jpg" in bodies and uri("outside") in bodies and uri("partial") in bodies
    assert any("relative path" in d["error"] and "cdn.example.com" in d["body"] for d in letters)
    assert relay.drain().rows == 0 and rec.take() == {}
    assert len(Ledger(make_engine(settings.effective_database_url)).dead_letter_rows()) == 4
    # its delete publishes nothing either: such a uri never reached the index
    cat.sql("DELETE FROM product_images WHERE id = :i", i=relative)
    assert relay.drain().rows == 1 and rec.take() == {}


@pytest.mark.parametrize("stamp", [1796492771, "", "2026-12-05T17:45:14.239Z", "2026-12-05"])
def test_timestamps_a_store_writes_in_another_form_do_not_stall_the_relay(make_settings, stamp: object) -> None:
    """SQLite keeps any type: a store writing updated_at/deleted_at as epoch seconds, "" or another
    ISO form made every read of the batch raise, so no later row was ever relayed. Now the image is
    relayed (a deleted_at of any value means deleted) and the rows after it too."""
    cat, rec, relay, p, a = _one_image_relayed(make_settings(), "SKU-1")
    cat.sql("UPDATE product_images SET updated_at = :v WHERE id = :i", v=stamp, i=a)
    cat.image(p, uri("after"))
    relay.drain()
    got = rec.take()
    assert got[uri("after")].action == "upsert" and cat.unprocessed() == 0
    assert uri("a") not in got or got[uri("a")].action == "upsert"
    cat.sql("UPDATE product_images SET deleted_at = :v WHERE id = :i", v=stamp, i=a)
    relay.drain()
    assert rec.take()[uri("a")].action == "delete" and cat.unprocessed() == 0
    relay.close()


def test_text_that_is_not_utf8_is_a_dead_letter_not_a_stall(make_settings) -> None:
    """SQLite keeps any bytes as TEXT: a uri or SKU a store wrote in another encoding made every read
    of the batch raise (sqlite3 cannot decode it), so no later row was ever relayed. Now each such
    image is a dead letter naming the bytes, and the rows around it are relayed."""
    settings = make_settings()
    cat, rec, relay, p, a = _one_image_relayed(settings, "SKU-1")
    bad_uri = cat.sql("INSERT INTO product_images (product_id, uri, position) "
                      "VALUES (:p, CAST(X'73333a2f2f6275636b65742f6361fffe2e6a7067' AS TEXT), 0) RETURNING id", p=p)[0][0]
    q = cat.sql("INSERT INTO products (sku) VALUES (CAST(X'534b552de9' AS TEXT)) RETURNING id")[0][0]
    cat.image(q, uri("latin1-sku"))
    cat.image(p, uri("after"))
    stats = relay.drain()
    got = rec.take()
    assert set(got) == {uri("after")} and got[uri("after")].sku == "SKU-1"
    assert stats.dead_letters == 2 and cat.unprocessed() == 0
    letters = Ledger(make_engine(settings.effective_database_url)).dead_letter_rows()
    errors = sorted(d["error"] for d in letters)
    assert all("not valid UTF-8" in e for e in errors), errors
    assert any("\\xff\\xfe" in e for e in errors) and any("SKU-\\xe9" in e for e in errors), errors
    # deleting the row whose uri was never relayed publishes nothing and stalls nothing either
    cat.sql("DELETE FROM product_images WHERE id = :i", i=bad_uri)
    cat.image(p, uri("later"))
    relay.drain()
    assert set(rec.take()) == {uri("later")} and cat.unprocessed() == 0
    relay.close()


def test_publish_failure_keeps_rows(setup) -> None:
    """When the broker refuses, no row is marked processed; the next pass publishes them."""
    _, cat, relay, rec = setup
    cat.image(cat.product("SKU-1"), uri("a"))
    rec.fail = ConnectionError("broker down")
    with pytest.raises(ConnectionError):
        relay.drain()
    assert cat.unprocessed() == 2
    rec.fail = None
    assert relay.drain().rows == 2
    assert set(rec.take()) == {uri("a")}


def test_batches_are_bounded(setup, make_settings) -> None:
    """IMGSYNC_OUTBOX_BATCH caps the rows claimed (and events published) per transaction."""
    settings, cat, _, _ = setup
    rec = Recorder()
    relay = OutboxRelay(settings.model_copy(update={"outbox_batch": 3}), publish=rec)
    p = cat.product("SKU-1")
    relay.drain()
    rec.take()
    for i in range(7):
        cat.image(p, uri(f"i{i}"))
    stats = relay.drain()
    relay.close()
    assert (stats.rows, stats.batches) == (7, 3)
    assert max(len(b) for b in rec.batches) <= 3
    assert len(rec.take()) == 7


def test_two_relays_share_the_work(setup) -> None:
    """Two relays at once (PostgreSQL: SKIP LOCKED; SQLite: BEGIN IMMEDIATE serializes them): every
    row is published by exactly one of them and processed; on PostgreSQL both take part."""
    settings, cat, relay, rec = setup
    p = cat.product("SKU-1")
    relay.drain()  # the product row (it would publish every image of the product)
    rec.take()
    settings = settings.model_copy(update={"outbox_batch": 5})
    recs = [Recorder(), Recorder()]
    relays = [OutboxRelay(settings, publish=r) for r in recs]
    for r in recs:
        r.delay = 0.05
    with cat.engine.begin() as conn:
        for i in range(40):
            conn.execute(sa.text("INSERT INTO product_images (product_id, uri) VALUES (:p, :u)"), {"p": p, "u": uri(f"i{i}")})
    threads = [threading.Thread(target=r.drain) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in relays:
        r.close()
    published = [set(r.take()) for r in recs]
    assert published[0] | published[1] == {uri(f"i{i}") for i in range(40)}
    assert not published[0] & published[1], "a row was claimed by both relays"
    if relay.postgres:
        assert published[0] and published[1], "both relays took part"
    assert cat.unprocessed() == 0


def test_run_polls_and_stops(make_settings) -> None:
    """SQLite: run() polls every IMGSYNC_OUTBOX_POLL_SECONDS and returns soon after stop is set."""
    settings = make_settings(outbox_poll_seconds=0.2)
    upgrade(settings.effective_database_url)
    upgrade_catalog(settings.effective_catalog_url)
    rec, stop = Recorder(), threading.Event()
    relay = OutboxRelay(settings, publish=rec)
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    try:
        time.sleep(0.3)
        Catalog(settings.effective_catalog_url).image(Catalog(settings.effective_catalog_url).product("S"), uri("a"))
        deadline = time.monotonic() + 5
        while not rec.batches and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(rec.take()) == {uri("a")}
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()
    relay.close()


def test_embedded_default_relays_through_the_real_publish(make_settings, tmp_path: Path) -> None:
    """The embedded default: the catalog is the state database (one SQLite file) and publishing
    writes its ledger. The relay used to hold the file's write lock while publishing, so the
    ledger write waited 30 s and failed: nothing was ever relayed. Now the image is recorded
    pending in the ledger and its preprocess message waits in the embedded broker, through
    `imgsync sources outbox --once` as a user runs it."""
    from kombu import Connection

    settings = make_settings()
    upgrade(settings.effective_database_url)
    upgrade_catalog(settings.effective_catalog_url)
    cat = Catalog(settings.effective_catalog_url)
    cat.image(cat.product("SKU-1"), uri("a"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSYNC_")}
    env.update(IMGSYNC_HOME=str(settings.home), IMGSYNC_MODEL="tiny", IMGSYNC_METRICS_PORT="0")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "sources", "outbox", "--once"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - started < 25, "the publish waited for the relay's own lock"
    assert cat.unprocessed() == 0
    ledger = Ledger(make_engine(settings.effective_database_url))
    row = ledger.get(image_id_for(uri("a")))
    assert row is not None and row.state == "pending" and row.sku == "SKU-1"
    ledger.engine.dispose()
    with Connection(settings.effective_broker_url) as conn:
        depth = conn.default_channel.queue_declare(queue=settings.queues.preprocess, passive=True).message_count
    assert depth == 1


def test_a_slow_publish_does_not_hold_a_sqlite_catalog(make_settings) -> None:
    """SQLite: while a batch is being published the catalog's own writers go on (they waited for the
    relay's write lock, and failed after the busy timeout when a publish took longer). PostgreSQL
    locks the claimed rows only."""
    settings = make_settings()
    upgrade(settings.effective_database_url)
    upgrade_catalog(settings.effective_catalog_url)
    cat, rec = Catalog(settings.effective_catalog_url), Recorder()
    relay = OutboxRelay(settings, publish=rec)
    p = cat.product("SKU-1")
    cat.image(p, uri("a"))
    rec.delay = 3.0
    t = threading.Thread(target=relay.drain)
    t.start()
    time.sleep(0.5)  # the relay is publishing now
    started = time.monotonic()
    cat.image(p, uri("b"))  # a store's write
    waited = time.monotonic() - started
    t.join(30)
    assert waited < 1.5, f"the catalog's writer waited {waited:.1f} s for the relay"
    rec.delay = 0.0
    relay.drain()
    assert set(rec.take()) == {uri("a"), uri("b")} and cat.unprocessed() == 0
    relay.close()


# --- PostgreSQL only -----------------------------------------------------------------------------


def test_late_commit_is_relayed(make_settings, pg_database) -> None:
    """A transaction opened first and committed after later ones (so its outbox id is lower than
    rows already relayed) is still relayed."""
    settings = make_settings(catalog_url=pg_database())
    upgrade(settings.effective_database_url)
    upgrade_catalog(settings.effective_catalog_url)
    cat, rec = Catalog(settings.effective_catalog_url), Recorder()
    relay = OutboxRelay(settings, publish=rec)
    p = cat.product("SKU-1")
    relay.drain()
    late = psycopg.connect(settings.effective_catalog_url.replace("+psycopg", ""))
    try:
        late.execute("INSERT INTO product_images (product_id, uri) VALUES (%s, %s)", (p, uri("late")))
        cat.image(p, uri("early"))
        relay.drain()
        assert set(rec.take()) == {uri("early")}
        late.commit()
    finally:
        late.close()
    ids = dict(cat.sql("SELECT new_uri, id FROM catalog_outbox WHERE entity = 'image'"))
    assert ids[uri("late")] < ids[uri("early")], "the late row sorts before one already relayed"
    relay.drain()
    got = rec.take()
    assert set(got) == {uri("late")}
    assert cat.unprocessed() == 0
    relay.close()


def test_a_repeatable_read_server_default_does_not_read_stale_state(make_settings, pg_database) -> None:
    """A catalog database whose default isolation is REPEATABLE READ: relay A claims, a SKU change
    commits, relay B relays it, then A ticks and reads. A used to read its claim's snapshot (the old
    SKU) under the higher version, so the stale SKU won; it now reads committed state."""
    url = pg_database()
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.replace("+psycopg", "")) as admin:
        admin.autocommit = True
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_isolation = \'repeatable read\'')
    settings = make_settings(catalog_url=url)
    upgrade(settings.effective_database_url)
    upgrade_catalog(settings.effective_catalog_url)
    cat, rec_a, rec_b = Catalog(settings.effective_catalog_url), Recorder(), Recorder()
    relay_a, relay_b = OutboxRelay(settings, publish=rec_a), OutboxRelay(settings, publish=rec_b)
    p = cat.product("SKU-1")
    cat.image(p, uri("a"))
    relay_a.drain()
    rec_a.take()
    cat.sql("UPDATE products SET sku = 'SKU-2' WHERE id = :p", p=p)
    claimed, go = threading.Event(), threading.Event()
    tick = relay_a._tick

    def held_tick(conn):  # type: ignore[no-untyped-def]
        claimed.set()
        go.wait(30)
        return tick(conn)

    relay_a._tick = held_tick  # type: ignore[method-assign]
    t = threading.Thread(target=relay_a.drain)
    t.start()
    assert claimed.wait(30)
    cat.sql("UPDATE products SET sku = 'SKU-3' WHERE id = :p", p=p)  # after A's claim, before its tick
    relay_b.drain()
    go.set()
    t.join(30)
    events = [*rec_a.take().values(), *rec_b.take().values()]
    newest = max(events, key=lambda e: e.version)
    assert newest.sku == "SKU-3", [(e.sku, e.version) for e in events]
    relay_a.close()
    relay_b.close()


def test_late_sku_change_outranks_a_change_relayed_before_it(make_settings, pg_database) -> None:
    """A SKU change committed late (lower outbox id) still yields the highest version for the
    product's images, so the ledger keeps the new SKU (versions order reads, not writes)."""
    settings = make_settings(catalog_url=pg_database())
    cat, rec, relay, p, a = _one_image_relayed(settings, "OLD")
    late = psycopg.connect(settings.effective_catalog_url.replace("+psycopg", ""))
    try:
        late.execute("UPDATE products SET sku = 'NEW' WHERE id = %s", (p,))
        cat.sql("UPDATE product_images SET updated_at = CURRENT_TIMESTAMP WHERE id = :i", i=a)  # bytes replaced
        relay.drain()
        early = rec.take()[uri("a")]
        late.commit()
    finally:
        late.close()
    relay.drain()
    final = rec.take()[uri("a")]
    relay.close()
    assert (early.sku, final.sku) == ("OLD", "NEW")
    assert final.version > early.version, "the late change must win in the ledger"


def test_notify_wakes_the_relay(make_settings, pg_database) -> None:
    """PostgreSQL: a commit wakes a waiting relay at once (poll interval 60 s), and stop ends it."""
    settings = make_settings(catalog_url=pg_database(), outbox_poll_seconds=60)
    upgrade(settings.effective_database_url)
    upgrade_catalog(settings.effective_catalog_url)
    cat, rec, stop = Catalog(settings.effective_catalog_url), Recorder(), threading.Event()
    relay = OutboxRelay(settings, publish=rec)
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    try:
        time.sleep(1.0)  # the relay has drained and is waiting
        cat.image(cat.product("SKU-1"), uri("a"))
        deadline = time.monotonic() + 5
        while not rec.batches and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(rec.take()) == {uri("a")}, "not woken by NOTIFY"
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()
    relay.close()


def test_unreachable_catalog_is_exit_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sources outbox` with the catalog down: exit 3, one line naming IMGSYNC_CATALOG_URL."""
    from worker.cli.main import app
    from worker.index.lite_server import free_port

    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMGSYNC_CATALOG_URL", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nope")
    result = CliRunner().invoke(app, ["sources", "outbox", "--once"])
    assert result.exit_code == 3, result.output
    assert "IMGSYNC_CATALOG_URL" in result.output and "Traceback" not in result.output


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_database):
    """The production stack with a catalog in a PostgreSQL database of its own; relays poll only
    every 30 s, so timely results need NOTIFY."""
    from tests.stack import running_stack

    catalog_url = pg_database()
    extra = {"IMGSYNC_CATALOG_URL": catalog_url, "IMGSYNC_OUTBOX_POLL_SECONDS": "30", "IMGSYNC_OUTBOX_BATCH": "4"}
    with running_stack(tmp_path_factory.mktemp("outbox"), "production", pg_database=pg_database, extra_env=extra) as st:
        yield st


def wait_until(check, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        ok, detail = check()
        if ok:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {detail}")
        time.sleep(0.2)


@pytest.mark.e2e
def test_outbox_end_to_end(stack, catalog, tmp_path: Path) -> None:
    """Two relay processes on a PostgreSQL catalog: inserts (one committed late), a uri change, a SKU
    change, soft and hard deletes reach the ledger and Milvus; SIGTERM stops both cleanly."""
    from worker.index import IMAGES_ALIAS, MilvusStore

    root = catalog(n_skus=4, per_sku=2)
    files = {f"{p.parent.name}/{p.stem}": str(p) for p in sorted(root.rglob("*.jpg"))}
    spare = tmp_path / "spare.jpg"
    Path(files["SKU-4/2"]).rename(spare)  # an image the catalog only points at later
    cat = Catalog(stack.settings.effective_catalog_url)
    upgrade_catalog(stack.settings.effective_catalog_url)  # the relays would; the test writes first
    assert Catalog(stack.settings.effective_catalog_url).tables() == CATALOG_TABLES
    ledger = Ledger(make_engine(stack.settings.effective_database_url))
    store = MilvusStore(stack.uri)
    logs = [open(stack.logs / f"relay{i}.log", "wb") for i in range(2)]  # noqa: SIM115
    relays = [
        subprocess.Popen([sys.executable, "-m", "worker.cli", "sources", "outbox"], env=stack.env, stdout=fh, stderr=subprocess.STDOUT)
        for fh in logs
    ]

    def expect(want: dict[str, tuple[str, str]]) -> None:
        """Ledger and Milvus agree with ``want``: path -> (state, sku)."""
        ids = {image_id_for(normalize_uri(p)): (p, s) for p, s in want.items()}

        def check():
            rows = ledger.rows(list(ids))
            got = {i: (r.state, r.sku) for i, r in rows.items()}
            if got != {i: s for i, (_, s) in ids.items()}:
                return False, {ids[i][0]: g for i, g in got.items() if g != ids[i][1]} or "missing rows"
            vectors = {r["image_id"]: r["sku"] for r in store.get_images(IMAGES_ALIAS, list(ids))}
            milvus_want = {i: s[1] for i, (_, s) in ids.items() if s[0] == "indexed"}
            return vectors == milvus_want, vectors

        wait_until(check, what="ledger and Milvus to follow the catalog")

    try:
        p = {sku: cat.product(sku) for sku in ("SKU-1", "SKU-2", "SKU-3")}
        late = psycopg.connect(stack.settings.effective_catalog_url.replace("+psycopg", ""))
        late.execute("INSERT INTO products (id, sku) VALUES (1000, 'SKU-4')")
        late.execute("INSERT INTO product_images (product_id, uri) VALUES (1000, %s)", (files["SKU-4/1"],))
        with cat.engine.begin() as conn:  # committed before the late transaction
            for key, path in files.items():
                sku = key.split("/")[0]
                if sku in p:
                    conn.execute(sa.text("INSERT INTO product_images (product_id, uri) VALUES (:p, :u)"), {"p": p[sku], "u": path})
        time.sleep(1.0)
        late.commit()
        late.close()
        expect({path: ("indexed", key.split("/")[0]) for key, path in files.items() if key != "SKU-4/2"})

        cat.sql("UPDATE products SET sku = 'SKU-1-NEW' WHERE id = :p", p=p["SKU-1"])
        cat.sql("UPDATE product_images SET uri = :new WHERE uri = :old", new=str(spare), old=files["SKU-2/2"])
        cat.sql("UPDATE products SET deleted_at = CURRENT_TIMESTAMP WHERE id = :p", p=p["SKU-3"])
        cat.sql("DELETE FROM products WHERE id = 1000")
        expect({
            files["SKU-1/1"]: ("indexed", "SKU-1-NEW"),
            files["SKU-1/2"]: ("indexed", "SKU-1-NEW"),
            files["SKU-2/1"]: ("indexed", "SKU-2"),
            files["SKU-2/2"]: ("deleted", "SKU-2"),
            str(spare): ("indexed", "SKU-2"),
            files["SKU-3/1"]: ("deleted", "SKU-3"),
            files["SKU-3/2"]: ("deleted", "SKU-3"),
            files["SKU-4/1"]: ("deleted", "SKU-4"),
        })
        assert cat.unprocessed() == 0
    finally:
        for proc in relays:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(15) for proc in relays]
        for fh in logs:
            fh.close()
    assert codes == [0, 0], [Path(fh.name).read_text()[-2000:] for fh in logs]
    assert os.path.getsize(logs[0].name) and "Traceback" not in Path(logs[0].name).read_text()
