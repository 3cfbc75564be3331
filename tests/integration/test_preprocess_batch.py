"""Large submissions travel as preprocess messages of several images: the real dispatcher on the
embedded broker, and the batch task run in this process over a real ledger (SQLite), a real Milvus
Lite server and the tiny model."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from kombu import Connection

from schemas.events import ImageEvent
from schemas.tasks import PreprocessPayload
from tests.helpers import photo
from worker import celery_app
from worker.dispatch import TASK_ENCODE, TASK_PREPROCESS, TASK_PREPROCESS_BATCH, preprocess_chunk
from worker.ledger import Ledger, make_engine, upgrade


def drain(settings, queue: str, header: str = "task") -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    """(the ``header`` (task name), first argument) of every message waiting in ``queue``, acknowledged."""
    out = []
    with Connection(settings.effective_broker_url) as conn:
        channel = conn.channel()
        channel.queue_declare(queue=queue)
        while (msg := channel.basic_get(queue)) is not None:
            out.append((msg.headers[header], msg.decode()[0][0]))
            msg.ack()
    return out


@pytest.fixture
def batch_env(make_settings, milvus_uri: str, tiny_encoder):
    settings = make_settings(milvus_uri=milvus_uri, preprocess_batch=8)
    upgrade(settings.effective_database_url)
    celery_app.configure(settings)
    celery_app.runtime().__dict__["encoder"] = tiny_encoder
    yield settings
    celery_app.runtime().ledger.engine.dispose()


@pytest.mark.parametrize(("n", "most", "want"), [(1, 16, 1), (127, 16, 1), (128, 16, 2), (640, 16, 10), (100_000, 16, 16), (5_000, 1, 1)])
def test_images_per_message(n: int, most: int, want: int) -> None:
    """Submissions under 128 images go one per message (spread over the CPU workers); larger ones
    n // 64 per message, at most IMGSYNC_PREPROCESS_BATCH."""
    assert preprocess_chunk(n, most) == want


def test_a_large_submission_travels_in_batch_messages_in_order(batch_env) -> None:
    """300 events: 75 messages of 4 (300 // 64), every event once, in submission order; a small
    submission stays one message per image."""
    settings = batch_env
    events = [ImageEvent(uri=f"s3://b/S/{i}.jpg", sku="S") for i in range(300)]
    celery_app.dispatcher().preprocess_many([PreprocessPayload(event=e, request_id="r") for e in events])
    sent = drain(settings, settings.queues.preprocess)
    assert {name for name, _ in sent} == {TASK_PREPROCESS_BATCH} and len(sent) == 75
    assert [item["event"]["uri"] for _, body in sent for item in body["items"]] == [e.uri for e in events]  # type: ignore[index]
    celery_app.dispatcher().preprocess_many([PreprocessPayload(event=e) for e in events[:5]])
    assert [name for name, _ in drain(settings, settings.queues.preprocess)] == [TASK_PREPROCESS] * 5


def test_messages_say_what_they_carry_in_a_short_argsrepr(batch_env) -> None:
    """Monitoring sees an image's URI, a batch's size and first URI, or the SKUs, instead of a repr of
    the whole payload (which Celery would build per message); the payload itself is whole."""
    settings = batch_env
    long_uri = "s3://b/" + "x" * 400 + ".jpg"
    events = [ImageEvent(uri=f"s3://b/S/{i}.jpg", sku="S") for i in range(256)]
    celery_app.dispatcher().preprocess_many([PreprocessPayload(event=e) for e in events])
    celery_app.dispatcher().preprocess(PreprocessPayload(event=ImageEvent(uri=long_uri, sku="S")))
    sent = drain(settings, settings.queues.preprocess, header="argsrepr")
    assert [r for r, _ in sent[:2]] == ["4 images: s3://b/S/0.jpg, …", "4 images: s3://b/S/4.jpg, …"]
    assert len(sent) == 65 and sent[-1][0] == long_uri[:256] and sent[-1][1]["event"]["uri"] == long_uri  # type: ignore[index]
    celery_app.dispatcher().refresh_skus([f"K{i}" for i in range(7)])
    celery_app.dispatcher().refresh_sku("ONE")
    skus = drain(settings, settings.queues.sku, header="argsrepr")
    assert [r for r, _ in skus] == ["K0, K1, K2, K3, K4 … (7 SKUs)", "ONE"]
    assert skus[0][1]["skus"] == [f"K{i}" for i in range(7)]  # type: ignore[index]


def _recorded_photos(settings, tmp_path: Path, n: int) -> list[ImageEvent]:  # type: ignore[no-untyped-def]
    """``n`` JPEGs of one new SKU, their events recorded in the ledger as a publisher records them."""
    sku = f"S-{uuid.uuid4().hex[:6]}"
    events = []
    for i in range(n):
        path = tmp_path / sku / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(96, 64, seed=i).save(path, quality=90)
        events.append(ImageEvent(uri=str(path), sku=sku))
    ledger = Ledger(make_engine(settings.effective_database_url))
    ledger.accept_many(events, "r")  # as the publisher records them
    ledger.engine.dispose()
    return events


def test_each_item_runs_alone_and_a_malformed_one_is_set_aside(batch_env, tmp_path: Path) -> None:
    """A batch message with three good images, a missing file and a malformed item: the good ones
    are handed to encode, the missing one is failed (not_found), the malformed one dead-lettered
    with reason invalid_event; the task answers the outcomes counted."""
    settings = batch_env
    good = _recorded_photos(settings, tmp_path, 3)
    missing = ImageEvent(uri=str(tmp_path / good[0].sku / "gone.jpg"), sku=good[0].sku)
    ledger = Ledger(make_engine(settings.effective_database_url))
    ledger.accept_many([missing], "r")
    dead_before = ledger.dead_letter_count()
    items = [PreprocessPayload(event=e, request_id="r").model_dump(mode="json") for e in (*good, missing)]
    items.insert(2, {"event": {"uri": 12, "sku": ""}})

    outcome = celery_app.app.tasks[TASK_PREPROCESS_BATCH]({"items": items})

    assert outcome == "failed=1,invalid=1,queued=3"
    encoded = drain(settings, settings.queues.encode)
    assert [name for name, _ in encoded] == [TASK_ENCODE] * 3
    assert sorted(body["event"]["uri"] for _, body in encoded) == sorted(e.uri for e in good)  # type: ignore[index]
    row = ledger.get(missing.image_id)
    assert row is not None and (row.state, row.reason) == ("failed", "not_found")
    assert ledger.dead_letter_count() == dead_before + 1
    ledger.engine.dispose()


def test_a_batch_reads_its_images_ledger_rows_in_one_go(batch_env, tmp_path: Path) -> None:
    """Five images and one image twice in a batch message: the five are read ahead in one query for
    their rows and one for their vectors, instead of two reads each; the image twice reads for
    itself per item (the second sees what the first did). All seven items are handed to encode."""
    events = _recorded_photos(batch_env, tmp_path, 6)
    items = [PreprocessPayload(event=e, request_id="r").model_dump(mode="json") for e in [*events, events[5]]]
    statements: list[str] = []
    engine = celery_app.runtime().ledger.engine
    listen = lambda *a: statements.append(" ".join(a[2].split()))  # noqa: E731
    sa.event.listen(engine, "before_cursor_execute", listen)
    try:
        assert celery_app.app.tasks[TASK_PREPROCESS_BATCH]({"items": items}) == "queued=7"
    finally:
        sa.event.remove(engine, "before_cursor_execute", listen)
    rows = [q for q in statements if "FROM images WHERE images.image_id" in q]
    held = [q for q in statements if "FROM image_vectors WHERE image_vectors.image_id" in q]
    # one read ahead each, plus the image twice reading for itself per item (7 each without it)
    assert len(rows) == 3 and len(held) == 3
    assert sum("IN (?, ?, ?, ?, ?)" in q for q in rows + held) == 2
    encoded = drain(batch_env, batch_env.queues.encode)
    assert sorted(body["event"]["uri"] for _, body in encoded) == sorted(e.uri for e in [*events, events[5]])  # type: ignore[index]


def test_a_ledger_that_cannot_read_ahead_leaves_each_item_to_read_for_itself(
    batch_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injected: the read ahead fails (the database hiccups). The message is not lost or
    failed: every item reads the ledger itself and is handed to encode; the worker says so."""
    events = _recorded_photos(batch_env, tmp_path, 4)
    ledger = celery_app.runtime().ledger

    def down(_ids: object) -> None:
        raise sa.exc.OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(ledger, "known_images", down)
    items = [PreprocessPayload(event=e, request_id="r").model_dump(mode="json") for e in events]
    assert celery_app.app.tasks[TASK_PREPROCESS_BATCH]({"items": items}) == "queued=4"
    assert sorted(body["event"]["uri"] for _, body in drain(batch_env, batch_env.queues.encode)) == sorted(e.uri for e in events)  # type: ignore[index]
    assert "could not read the ledger ahead for 4 images" in caplog.text


@pytest.mark.parametrize("body", [{"items": []}, {"items": "x"}, {"nope": 1}, "not a payload"])
def test_a_malformed_batch_message_is_dead_lettered(batch_env, body: object) -> None:
    """A batch message that is not a list of items is set aside whole, with reason invalid_event."""
    ledger = Ledger(make_engine(batch_env.effective_database_url))
    before = ledger.dead_letter_count()
    assert celery_app.app.tasks[TASK_PREPROCESS_BATCH](body) == "invalid"
    assert ledger.dead_letter_count() == before + 1
    assert any(r["task"] == TASK_PREPROCESS_BATCH for r in ledger.dead_letter_rows())
    ledger.engine.dispose()
