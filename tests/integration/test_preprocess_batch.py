"""Large submissions travel as preprocess messages of several images: the real dispatcher on the
embedded broker, and the batch task run in this process over a real ledger (SQLite), a real Milvus
Lite server and the tiny model."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
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


def test_each_item_runs_alone_and_a_malformed_one_is_set_aside(batch_env, tmp_path: Path) -> None:
    """A batch message with three good images, a missing file and a malformed item: the good ones
    are handed to encode, the missing one is failed (not_found), the malformed one dead-lettered
    with reason invalid_event; the task answers the outcomes counted."""
    settings = batch_env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    good = []
    for i in range(3):
        path = tmp_path / sku / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(160, 120, seed=i).save(path, quality=90)
        good.append(ImageEvent(uri=str(path), sku=sku))
    missing = ImageEvent(uri=str(tmp_path / sku / "gone.jpg"), sku=sku)
    ledger = Ledger(make_engine(settings.effective_database_url))
    ledger.accept_many([*good, missing], "r")
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


@pytest.mark.parametrize("body", [{"items": []}, {"items": "x"}, {"nope": 1}, "not a payload"])
def test_a_malformed_batch_message_is_dead_lettered(batch_env, body: object) -> None:
    """A batch message that is not a list of items is set aside whole, with reason invalid_event."""
    ledger = Ledger(make_engine(batch_env.effective_database_url))
    before = ledger.dead_letter_count()
    assert celery_app.app.tasks[TASK_PREPROCESS_BATCH](body) == "invalid"
    assert ledger.dead_letter_count() == before + 1
    assert any(r["task"] == TASK_PREPROCESS_BATCH for r in ledger.dead_letter_rows())
    ledger.engine.dispose()
