"""Work whose broker message was lost is sent again from the ledger (worker.redrive): real SQLite and
PostgreSQL ledgers, the real embedded broker and Celery's own message format."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kombu import Connection

from schemas.events import Action, ImageEvent, image_id_for
from schemas.reasons import Reason
from tests.helpers import empty_ledger
from worker.celery_app import configure, dispatcher
from worker.dispatch import TASK_PREPROCESS, TASK_REFRESH_SKU
from worker.ledger import IndexedImage, Ledger, make_engine, upgrade
from worker.ledger.tables import images, skus
from worker.metrics import metrics
from worker.redrive import Redrive, is_leader
from worker.status import queue_depths


@pytest.fixture(params=["sqlite", "postgresql"])
def setup(request: pytest.FixtureRequest, make_settings, tmp_path: Path):
    settings = make_settings(redrive_after_seconds=60)
    url = settings.effective_database_url if request.param == "sqlite" else request.getfixturevalue("pg_url")
    ledger = empty_ledger(url)
    configure(settings)
    yield settings, ledger
    ledger.engine.dispose()


def ev(name: str, sku: str = "SKU-1", version: int = 10, action: Action = Action.upsert) -> ImageEvent:
    return ImageEvent(uri=f"s3://b/{sku}/{name}.jpg", sku=sku, version=version, action=action)


def backdate(ledger: Ledger, image_ids: list[str] = (), sku_ids: list[str] = ()) -> None:  # type: ignore[assignment]
    """Set the rows' last step an hour back from now."""
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with ledger.engine.begin() as conn:
        conn.execute(images.update().where(images.c.image_id.in_(list(image_ids))).values(updated_at=hour_ago))
        conn.execute(skus.update().where(skus.c.sku.in_(list(sku_ids))).values(updated_at=hour_ago))


def drain(settings) -> dict[str, list]:  # type: ignore[no-untyped-def]
    """Every message waiting per queue, as (task name, payload), acknowledged."""
    out: dict[str, list] = {}
    with Connection(settings.effective_broker_url) as conn:
        channel = conn.channel()
        for q in settings.queues.all():
            out[q] = []
            channel.queue_declare(queue=q)
            while (msg := channel.basic_get(q)) is not None:
                body = msg.decode()
                task = msg.headers.get("task")  # None: a plain message put there by the test
                out[q].append((task, body[0][0] if task else body))
                msg.ack()
        channel.close()
    return out


def test_stalled_images_and_skus_are_sent_again_once(setup) -> None:
    settings, ledger = setup
    lost, fresh, done, changed, failed = ev("lost"), ev("fresh"), ev("done"), ev("changed"), ev("failed")
    for e in (lost, fresh, done, changed, failed):
        ledger.accept(e, request_id="req-1")
    ledger.mark_indexed([IndexedImage(e.image_id, e.version, "h", "model-a", "req-1") for e in (done, changed)])
    newer = ev("changed", version=11)  # a new event for an indexed image: it stays indexed, no outcome yet
    ledger.accept(newer, request_id="req-2")
    ledger.mark_failed(failed.image_id, failed.version, Reason.corrupt, "bad")
    ledger.mark_dirty(["SKU-2"])
    ledger.finish_sku("SKU-1", ledger.sku_generation("SKU-1")[0], 2, "model-a")  # SKU-1 clean
    backdate(ledger, [lost.image_id, done.image_id, changed.image_id, failed.image_id], ["SKU-1", "SKU-2"])
    assert sum(queue_depths(settings).values()) == 0
    before = metrics().redriven.labels("image")._value.get()

    report = Redrive(settings, ledger, dispatcher()).run_once()

    assert (report.images, report.skus, report.skipped) == (2, 1, "")
    sent = drain(settings)
    images_sent = {p["event"]["uri"]: p for name, p in sent[settings.queues.preprocess] if name == TASK_PREPROCESS}
    assert set(images_sent) == {lost.uri, newer.uri}  # not the fresh, indexed, failed ones
    assert images_sent[lost.uri]["event"]["version"] == lost.version  # its own version: a replay
    assert images_sent[newer.uri]["event"]["version"] == newer.version and images_sent[newer.uri]["request_id"] == "req-2"
    assert images_sent[lost.uri]["event"]["source"] == "redrive"
    assert [(name, p["skus"]) for name, p in sent[settings.queues.sku]] == [(TASK_REFRESH_SKU, ["SKU-2"])]
    assert metrics().redriven.labels("image")._value.get() == before + 2
    # the idle clock restarted: the next look sends nothing
    assert Redrive(settings, ledger, dispatcher()).run_once() == type(report)()
    assert sum(len(v) for v in drain(settings).values()) == 0


def test_nothing_is_sent_while_the_queues_hold_messages(setup) -> None:
    """A backlog: its images wait their turn in the queue; sending them again would double it."""
    settings, ledger = setup
    lost = ev("lost")
    ledger.accept(lost)
    ledger.mark_dirty(["SKU-9"])
    backdate(ledger, [lost.image_id], ["SKU-9"])
    dispatcher().refresh_sku("SKU-0", countdown=None)  # messages wait in the sku and encode queues
    with Connection(settings.effective_broker_url) as conn:
        conn.SimpleQueue(settings.queues.encode).put({"waiting": True})
    report = Redrive(settings, ledger, dispatcher()).run_once()
    assert (report.images, report.skus, report.skipped) == (0, 0, "busy")
    sent = drain(settings)
    assert len(sent[settings.queues.encode]) == 1 and len(sent[settings.queues.sku]) == 1  # only what was there
    assert not sent[settings.queues.preprocess]
    # queues empty now: both go
    report = Redrive(settings, ledger, dispatcher()).run_once()
    assert (report.images, report.skus) == (1, 1)


def test_an_unreachable_broker_skips_the_look(setup) -> None:
    settings, ledger = setup
    lost = ev("lost")
    ledger.accept(lost)
    backdate(ledger, [lost.image_id])

    def down() -> dict[str, int | None]:
        raise ConnectionError("broker down")

    assert Redrive(settings, ledger, dispatcher(), depths=down).run_once().skipped == "broker"
    assert ledger.stalled_images(datetime.now(UTC) - timedelta(minutes=1))[0].image_id == lost.image_id  # untouched


def test_a_transient_retry_restarts_the_idle_clock(setup) -> None:
    settings, ledger = setup
    e = ev("retrying")
    ledger.accept(e)
    backdate(ledger, [e.image_id])
    ledger.note_attempt(e.image_id, e.version, Reason.fetch_timeout, "slow")
    assert ledger.stalled_images(datetime.now(UTC) - timedelta(minutes=1)) == []


def test_after_a_full_disk_work_idle_half_a_minute_is_sent_again_at_once(setup, monkeypatch) -> None:
    """Embedded mode: steps that could not be recorded while IMGSYNC_HOME's disk was full left their
    images pending, sent again only after the redrive delay (20 min by default). The first look
    after the disk has room again sends what has been idle for AFTER_DISK_FULL_SECONDS, without
    waiting for the look interval; other looks keep the full delay."""
    import worker.redrive as redrive_module
    import worker.status as status_module

    settings, ledger = setup
    stuck = ev("stuck")
    ledger.accept(stuck)
    with ledger.engine.begin() as conn:
        conn.execute(images.update().where(images.c.image_id == stuck.image_id)
                     .values(updated_at=datetime.now(UTC) - timedelta(seconds=45)))
    redrive = Redrive(settings, ledger, dispatcher())
    assert redrive.run_once().images == 0  # 45 s idle: under the 60 s delay
    looks: list[float | None] = []
    real_run_once = redrive.run_once

    def run_once(now=None, idle_for=None):  # type: ignore[no-untyped-def]
        looks.append(idle_for)
        return real_run_once(now, idle_for)

    disk = iter(["full"] * 3 + [None] * 1000)
    monkeypatch.setattr(status_module, "disk_problem", lambda _settings: next(disk))
    monkeypatch.setattr(redrive_module, "DISK_LOOK_SECONDS", 0.05)
    monkeypatch.setattr(redrive_module, "is_leader", lambda *_: True)
    monkeypatch.setattr(redrive, "run_once", run_once)
    thread = redrive_module.RedriveThread(redrive, "node", interval=3600, max_age_seconds=60).start()
    try:
        deadline = time.monotonic() + 10
        while not looks and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # no second look: the interval (an hour) has not passed
    finally:
        thread.stop()
    assert looks == [redrive_module.AFTER_DISK_FULL_SECONDS]
    sent = drain(settings)[settings.queues.preprocess]
    assert [payload["event"]["uri"] for _task, payload in sent] == [stuck.uri]


def test_the_leader_is_the_live_preprocess_node_with_the_smallest_name(setup) -> None:
    _settings, ledger = setup
    ledger.heartbeat("b-node:2", host="b", pid=2, queues="preprocess,sku", model="tiny")
    ledger.heartbeat("a-node:1", host="a", pid=1, queues="encode", model="tiny")  # no preprocess queue
    ledger.heartbeat("c-node:3", host="c", pid=3, queues="preprocess", model="tiny")
    assert is_leader(ledger, "b-node:2", "preprocess", 60)
    assert not is_leader(ledger, "c-node:3", "preprocess", 60)
    assert not is_leader(ledger, "a-node:1", "preprocess", 60)
    ledger.forget_worker("b-node:2")
    assert is_leader(ledger, "c-node:3", "preprocess", 60)
    assert not is_leader(ledger, "z-node:9", "preprocess", 60)  # a node whose heartbeat is missing


def test_redrive_after_defaults_to_visibility_timeout_plus_longest_backoff(make_settings) -> None:
    assert make_settings().effective_redrive_after == 900 + 300
    assert make_settings(broker_visibility_timeout=60, retry_backoff_max=20).effective_redrive_after == 80
    assert make_settings(redrive_after_seconds=30).effective_redrive_after == 30


def test_waiting_work_is_reported_by_the_ledger(setup) -> None:
    _settings, ledger = setup
    idle_since = datetime.now(UTC) - timedelta(minutes=1)
    assert (ledger.oldest_waiting_seconds(), ledger.stalled_count(idle_since)) == (None, 0)
    old, new, done = ev("old"), ev("new"), ev("done")
    for e in (old, new, done):
        ledger.accept(e)
    ledger.mark_indexed([IndexedImage(done.image_id, done.version, "h", "model-a", "")])
    backdate(ledger, [old.image_id, done.image_id])
    oldest, stalled = ledger.oldest_waiting_seconds(), ledger.stalled_count(idle_since)
    assert 3590 < oldest < 3700 and stalled == 1  # "new" waits too, but not for long; "done" is done


def test_status_and_the_scrape_gauge_show_the_oldest_waiting_image(make_settings) -> None:
    """`imgsync status --json` fields and imgsync_oldest_waiting_seconds, from the embedded ledger."""
    from worker.metrics.collectors import StateCollector
    from worker.status import collect_status

    settings = make_settings(redrive_after_seconds=600)
    upgrade(settings.effective_database_url)
    ledger = Ledger(make_engine(settings.effective_database_url))
    ledger.register_version("model-a", "tiny", "imgsync_images__a", "imgsync_skus__a", 64, serve_if_first=True)
    doc = collect_status(settings)
    assert doc.waiting_oldest_seconds is None and doc.stalled == 0
    lost = ev("lost")
    ledger.accept(lost)
    backdate(ledger, [lost.image_id])
    doc = collect_status(settings)
    assert doc.stalled == 1 and 3590 < doc.waiting_oldest_seconds < 3700
    gauges = {s.name: s.value for fam in StateCollector(settings).collect() for s in fam.samples}
    assert 3590 < gauges["imgsync_oldest_waiting_seconds"] < 3700
    ledger.engine.dispose()


@pytest.mark.parametrize("was", ["indexed", "pending"])
def test_a_lost_delete_is_sent_again_as_a_delete(setup, was: str) -> None:
    """A delete accepted by a worker that then died: sending it again as an upsert would index the
    image anew when its object still exists (a catalog row deleted, the file left in storage)."""
    settings, ledger = setup
    first = ev("gone")
    ledger.accept(first, request_id="req-1")
    if was == "indexed":
        ledger.mark_indexed([IndexedImage(first.image_id, first.version, "h", "model-a", "req-1")])
    delete = ev("gone", version=11, action=Action.delete)
    assert ledger.accept(delete, request_id="req-2").current
    backdate(ledger, [delete.image_id])

    report = Redrive(settings, ledger, dispatcher()).run_once()

    assert report.images == 1
    [(name, payload)] = drain(settings)[settings.queues.preprocess]
    assert payload["event"]["action"] == "delete"
    assert payload["event"]["version"] == delete.version and payload["request_id"] == "req-2"
    assert ledger.get(delete.image_id).event().action is Action.delete
    # a newer upsert makes the row's event an upsert again
    ledger.accept(ev("gone", version=12), request_id="req-3")
    assert ledger.get(delete.image_id).event().action is Action.upsert


def test_an_event_lost_on_its_way_to_the_first_worker_is_sent_again(setup, monkeypatch) -> None:
    """Sources record an event in the ledger before they publish it: a preprocess message the broker
    loses before any worker saw it (kombu's Redis transport pops before it records the message as
    taken) leaves the image waiting in the ledger, and the redrive sends it again."""
    from worker.sources import common

    settings, ledger = setup
    monkeypatch.setattr(common, "_ledger", lambda url: ledger)  # this test's ledger (SQLite or PostgreSQL)
    lost, stale = ev("lost-on-the-way"), ev("old", version=5)
    ledger.accept(ev("old", version=9), request_id="req-0")
    request_id = common.publish_events(settings, [lost, stale])
    sent = drain(settings)[settings.queues.preprocess]  # the broker loses the message: nobody takes it
    assert [p["event"]["uri"] for _, p in sent] == [lost.uri]  # the stale one was answered, not sent
    row = ledger.get(lost.image_id)
    assert (row.state, row.outcome, row.request_id) == ("pending", None, request_id)
    assert ledger.get(stale.image_id).outcome == "unchanged"

    backdate(ledger, [lost.image_id])
    report = Redrive(settings, ledger, dispatcher()).run_once()

    assert report.images == 1
    [(_, payload)] = drain(settings)[settings.queues.preprocess]
    assert payload["event"]["uri"] == lost.uri and payload["request_id"] == request_id


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_an_image_a_worker_holds_is_not_sent_again(make_settings, broker: str) -> None:
    """The tail of a long backlog: the queue is empty, the ledger row idle, but a worker holds the
    message (prefetched, buffered, or waiting for a retry's countdown). Only the lost image goes."""
    import uuid

    from schemas.tasks import PreprocessPayload
    from tests.conftest import REDIS_URL
    from worker.redrive import in_flight_images

    tag = uuid.uuid4().hex[:8]
    extra = {} if broker == "embedded" else {
        "broker_url": REDIS_URL, "queue_preprocess": f"pre-{tag}", "queue_encode": f"enc-{tag}", "queue_sku": f"sku-{tag}",
    }  # fmt: skip
    settings = make_settings(redrive_after_seconds=60, **extra)
    ledger = empty_ledger(settings.effective_database_url)
    configure(settings)
    held, lost = ev(f"held-{tag}"), ev(f"lost-{tag}")
    ledger.accept_many([held, lost], "req")
    dispatcher().preprocess(PreprocessPayload(event=held, request_id="req"))
    with Connection(settings.effective_broker_url) as conn:
        channel = conn.channel()
        taken = channel.basic_get(settings.queues.preprocess)  # delivered to "a worker", not acknowledged
        assert taken is not None
        backdate(ledger, [held.image_id, lost.image_id])
        assert held.image_id in in_flight_images(settings)
        assert lost.image_id not in in_flight_images(settings)

        report = Redrive(settings, ledger, dispatcher()).run_once()

        assert report.images == 1
        [(_, payload)] = drain(settings)[settings.queues.preprocess]
        assert payload["event"]["uri"] == lost.uri
        taken.ack()
    ledger.engine.dispose()


@pytest.mark.parametrize("kind", ["preprocess", "encode"])
@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_images_a_worker_holds_in_a_batch_message_are_not_sent_again(make_settings, broker: str, kind: str) -> None:
    """A large submission travels as preprocess messages of several images, and each such message's
    encodes as one encode message: every image of a batch message a worker holds unacknowledged
    counts as in flight, not lost."""
    import uuid

    from schemas.tasks import EncodePayload, PreprocessPayload
    from tests.conftest import REDIS_URL
    from worker.dispatch import TASK_ENCODE, TASK_PREPROCESS_BATCH
    from worker.redrive import in_flight_images

    tag = uuid.uuid4().hex[:8]
    extra = {} if broker == "embedded" else {
        "broker_url": REDIS_URL, "queue_preprocess": f"pre-{tag}", "queue_encode": f"enc-{tag}", "queue_sku": f"sku-{tag}",
    }  # fmt: skip
    settings = make_settings(redrive_after_seconds=60, preprocess_batch=4, **extra)
    configure(settings)
    events = [ev(f"b{i}-{tag}") for i in range(256)]  # 256 // 64 = 4 images per message
    if kind == "preprocess":
        dispatcher().preprocess_many([PreprocessPayload(event=e, request_id="req") for e in events])
        queue, task = settings.queues.preprocess, TASK_PREPROCESS_BATCH
    else:
        dispatcher().encode_many([EncodePayload(event=e, content_hash="h", pixel_key=f"k{i}") for i, e in enumerate(events[:4])])
        queue, task = settings.queues.encode, TASK_ENCODE
    with Connection(settings.effective_broker_url) as conn:
        channel = conn.channel()
        taken = channel.basic_get(queue)
        assert taken is not None and taken.headers["task"] == task
        held = {image_id_for(item["event"]["uri"]) for item in taken.decode()[0][0]["items"]}
        assert len(held) == 4
        assert held <= in_flight_images(settings)
        taken.ack()
    drain(settings)
