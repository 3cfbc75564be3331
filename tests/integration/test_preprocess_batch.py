"""Large submissions travel as preprocess messages of several images, and each message's encodes as
one encode message: the real dispatcher on the embedded broker, and the batch and encode tasks run in
this process over a real ledger (SQLite), a real Milvus Lite server and the tiny model."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sqlalchemy as sa
from kombu import Connection
from kombu.exceptions import OperationalError

from schemas.events import ImageEvent
from schemas.tasks import PreprocessPayload
from tests.helpers import photo
from worker import celery_app, encode_stage, health, pipeline
from worker.dispatch import IMAGES_HEADER, TASK_ENCODE, TASK_PREPROCESS, TASK_PREPROCESS_BATCH, Dispatcher, preprocess_chunk
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


def encoded_uris(settings) -> list[str]:  # type: ignore[no-untyped-def]
    """The uris of every image in the encode queue (messages of one or several), acknowledged."""
    bodies = [body for _, body in drain(settings, settings.queues.encode)]
    return [item["event"]["uri"] for b in bodies for item in (b["items"] if "items" in b else [b])]  # type: ignore[index, operator]


@pytest.fixture
def batch_env(make_settings, milvus_uri: str, tiny_encoder, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(health, "_gate", health.Gate())  # open, whatever earlier tests did to this process's gate
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
    assert [name for name, _ in encoded] == [TASK_ENCODE]  # the three encodes leave as one message
    assert sorted(item["event"]["uri"] for item in encoded[0][1]["items"]) == sorted(e.uri for e in good)  # type: ignore[index]
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
    assert sorted(encoded_uris(batch_env)) == sorted(e.uri for e in [*events, events[5]])


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
    assert sorted(encoded_uris(batch_env)) == sorted(e.uri for e in events)
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


def _batch_encode_message(settings, tmp_path: Path, n: int) -> tuple[list[ImageEvent], dict]:  # type: ignore[no-untyped-def]
    """Preprocess ``n`` new photos as one batch message; the one encode message it sends, taken."""
    events = _recorded_photos(settings, tmp_path, n)
    items = [PreprocessPayload(event=e, request_id="r").model_dump(mode="json") for e in events]
    assert celery_app.app.tasks[TASK_PREPROCESS_BATCH]({"items": items}) == f"queued={n}"
    [(count, body)] = drain(settings, settings.queues.encode, header=IMAGES_HEADER)
    assert count == n and len(body["items"]) == n  # type: ignore[arg-type, index]  # the header says how many
    return events, body  # type: ignore[return-value]


def test_one_encode_message_carries_a_batchs_images_into_milvus_in_model_batches(
    batch_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch message's five encodes travel as one encode message; the encode task takes its items
    as five images in model batches of at most IMGSYNC_BATCH_MAX (2 here): every vector lands in
    Milvus, equal to the model's vector of the image, and every ledger row says indexed."""
    events, body = _batch_encode_message(batch_env, tmp_path, 5)
    sizes: list[int] = []
    real = encode_stage.start_encode
    monkeypatch.setattr(encode_stage, "start_encode", lambda rt, d, ps: sizes.append(len(ps)) or real(rt, d, ps))
    task = celery_app.app.tasks[TASK_ENCODE]
    monkeypatch.setattr(task, "flush_images", 2)

    out = task([SimpleNamespace(args=(body,), kwargs={})])

    assert (out["indexed"], out["failed"], out["retried"], sizes) == (5, 0, 0, [2, 2, 1])
    rt = celery_app.runtime()
    assert [rt.ledger.get(e.image_id).state for e in events] == ["indexed"] * 5  # type: ignore[union-attr]
    names = rt.names_for(rt.version_for(rt.serving().model_id))  # type: ignore[arg-type]
    stored = {r["image_id"]: r for r in rt.store.get_images(names.images, [e.image_id for e in events])}
    assert set(stored) == {e.image_id for e in events}
    want = rt.encoder.encode([pipeline.model_pixels(rt, Path(events[3].uri.removeprefix("file://")).read_bytes(), None)])[0]
    assert np.allclose(stored[events[3].image_id]["vector"], want, atol=1e-5)


def test_write_behind_writes_in_its_thread_while_the_flush_returns(
    batch_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMGSYNC_ENCODE_OVERLAP=on in the solo pool's process: five images in model batches of 3 and 2
    are started (their forward passes run) and handed to the writer thread, and the flush returns while
    they are written: with the writer held up, nothing is in Milvus yet, the rows are pending, and
    the task says how many images and flushes are still being written (their messages must wait
    for their acknowledgement). The next flush (the idle timer's empty one) waits for the writer:
    every vector is in Milvus, equal to the model's, and every row indexed."""
    events, body = _batch_encode_message(batch_env, tmp_path, 5)
    task = celery_app.app.tasks[TASK_ENCODE]
    monkeypatch.setattr(task, "flush_images", 3)
    monkeypatch.setattr(task, "overlap", "on")
    monkeypatch.setattr(task, "_solo_pid", os.getpid())
    gate, writer_threads = threading.Event(), set()
    real = encode_stage.finish_encode

    def held_up(rt, d, started):  # type: ignore[no-untyped-def]
        writer_threads.add(threading.current_thread().name)
        assert gate.wait(30)
        return real(rt, d, started)

    monkeypatch.setattr(encode_stage, "finish_encode", held_up)
    rt = celery_app.runtime()
    names = rt.names_for(rt.version_for(rt.serving().model_id))  # type: ignore[arg-type]
    ids = [e.image_id for e in events]

    out = task([SimpleNamespace(args=(body,), kwargs={})])

    assert (out["indexed"], out["held"], out["held_flushes"]) == (0, 5, 1)
    assert [rt.ledger.get(i).state for i in ids] == ["pending"] * 5  # type: ignore[union-attr]
    assert rt.store.get_images(names.images, ids) == []
    gate.set()

    out = task([])

    assert (out["indexed"], out.get("held", 0), out.get("held_flushes", 0)) == (5, 0, 0)
    assert writer_threads and all(n.startswith("imgsync-writer") for n in writer_threads)
    assert [rt.ledger.get(i).state for i in ids] == ["indexed"] * 5  # type: ignore[union-attr]
    stored = {r["image_id"]: r for r in rt.store.get_images(names.images, ids)}
    want = rt.encoder.encode([pipeline.model_pixels(rt, Path(events[4].uri.removeprefix("file://")).read_bytes(), None)])[0]
    assert np.allclose(stored[ids[4]]["vector"], want, atol=1e-5)


def test_write_behind_needs_the_solo_pool_and_is_off_when_asked(
    batch_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside the solo pool's process (a prefork child), or with IMGSYNC_ENCODE_OVERLAP=off, or on
    a CPU with ``auto``, nothing is held: every image is written before the flush returns."""
    task = celery_app.app.tasks[TASK_ENCODE]
    monkeypatch.setattr(task, "flush_images", 2)
    for mode, pid in (("on", os.getpid() + 1), ("off", os.getpid()), ("auto", os.getpid())):
        monkeypatch.setattr(task, "overlap", mode)
        monkeypatch.setattr(task, "_solo_pid", pid)
        events, body = _batch_encode_message(batch_env, tmp_path / mode, 3)
        out = task([SimpleNamespace(args=(body,), kwargs={})])
        assert (out["indexed"], out.get("held", 0)) == (3, 0), mode
        ledger = celery_app.runtime().ledger
        assert [ledger.get(e.image_id).state for e in events] == ["indexed"] * 3  # type: ignore[union-attr]


def test_write_behind_hands_a_batch_back_when_its_write_fails(
    batch_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch cannot be recorded when the writer thread writes it (the ledger fails): its images
    are re-published to the encode queue with backoff, not lost, and the worker goes on."""
    events, body = _batch_encode_message(batch_env, tmp_path, 3)
    task = celery_app.app.tasks[TASK_ENCODE]
    monkeypatch.setattr(task, "flush_images", 3)
    monkeypatch.setattr(task, "overlap", "on")
    monkeypatch.setattr(task, "_solo_pid", os.getpid())
    ledger = celery_app.runtime().ledger

    def down(*_a: object, **_k: object) -> None:
        raise sa.exc.OperationalError("UPDATE images", {}, Exception("database is down"))

    monkeypatch.setattr(ledger, "mark_indexed", down)
    first = task([SimpleNamespace(args=(body,), kwargs={})])
    last = task([])
    assert first["indexed"] + last["indexed"] == 0 and first["retried"] + last["retried"] == 3
    again = [b for _, b in drain(batch_env, batch_env.queues.encode)]
    assert sorted(p["event"]["uri"] for p in again) == sorted(e.uri for e in events)  # type: ignore[index]


def test_a_paused_encode_worker_hands_a_batch_message_back_whole(batch_env, tmp_path: Path) -> None:
    """The encode worker is paused (Milvus or the device down): the images of a batch message go
    back to the encode queue unchanged, attempts unused, as one message; none is failed."""
    events, body = _batch_encode_message(batch_env, tmp_path, 3)
    health.gate().trip("index_unavailable: test")

    out = celery_app.app.tasks[TASK_ENCODE]([SimpleNamespace(args=(body,), kwargs={})])

    assert (out["requeued"], out["indexed"], out["failed"]) == (3, 0, 0)
    [(name, back)] = drain(batch_env, batch_env.queues.encode)
    assert name == TASK_ENCODE and back == body
    ledger = celery_app.runtime().ledger
    assert [ledger.get(e.image_id).state for e in events] == ["pending"] * 3  # type: ignore[union-attr]


def test_a_malformed_item_of_an_encode_message_is_set_aside_alone(batch_env, tmp_path: Path) -> None:
    """An encode message with three good items and a malformed one: the three are indexed, the bad
    one dead-lettered (invalid_event). A batch encode message that is not a list of items is set
    aside whole; the worker goes on."""
    events, body = _batch_encode_message(batch_env, tmp_path, 3)
    body["items"].insert(1, {"event": {"uri": 5}, "pixel_key": ""})
    ledger = celery_app.runtime().ledger
    before = ledger.dead_letter_count()
    task = celery_app.app.tasks[TASK_ENCODE]

    out = task([SimpleNamespace(args=(body,), kwargs={}), SimpleNamespace(args=({"items": []},), kwargs={})])

    assert out["indexed"] == 3
    assert [ledger.get(e.image_id).state for e in events] == ["indexed"] * 3  # type: ignore[union-attr]
    assert ledger.dead_letter_count() == before + 2
    assert {r["task"] for r in ledger.dead_letter_rows()[-2:]} == {TASK_ENCODE}


def test_a_broker_refusing_a_batchs_encode_message_retries_each_image(
    batch_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injected: the broker refuses the batch's encode message. No image is lost: each is
    sent again on its own as an encode retry (attempt 1, its stored pixels kept for it)."""
    events = _recorded_photos(batch_env, tmp_path, 3)
    items = [PreprocessPayload(event=e, request_id="r").model_dump(mode="json") for e in events]

    def refuse(self: Dispatcher, payloads: object) -> None:
        raise OperationalError("Error 111 connecting to the broker: Connection refused")

    monkeypatch.setattr(Dispatcher, "encode_many", refuse)
    assert celery_app.app.tasks[TASK_PREPROCESS_BATCH]({"items": items}) == "retried=3"

    sent = drain(batch_env, batch_env.queues.encode)
    assert [name for name, _ in sent] == [TASK_ENCODE] * 3
    assert sorted(b["event"]["uri"] for _, b in sent) == sorted(e.uri for e in events)  # type: ignore[index]
    assert {b["attempt"] for _, b in sent} == {1}  # type: ignore[index]
    assert all(celery_app.runtime().pixels.get(b["pixel_key"]) is not None for _, b in sent)  # type: ignore[index]
    assert "publishing 3 encode payloads failed" in caplog.text


def test_a_broker_refusing_every_encode_leaves_the_images_pending_for_the_redrive(
    batch_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injected: the broker refuses the batch's encode message and every retry. The task
    still ends normally; the images stay pending in the ledger, which is what the redrive sends
    again once the broker is back."""
    events = _recorded_photos(batch_env, tmp_path, 2)
    items = [PreprocessPayload(event=e, request_id="r").model_dump(mode="json") for e in events]

    def refuse(*_a: object, **_k: object) -> None:
        raise OperationalError("Error 111 connecting to the broker: Connection refused")

    monkeypatch.setattr(Dispatcher, "encode_many", refuse)
    monkeypatch.setattr(Dispatcher, "_publish", refuse)
    assert celery_app.app.tasks[TASK_PREPROCESS_BATCH]({"items": items}) == "retried=2"
    assert drain(batch_env, batch_env.queues.encode) == []
    ledger = celery_app.runtime().ledger
    assert [ledger.get(e.image_id).state for e in events] == ["pending"] * 2  # type: ignore[union-attr]
    assert caplog.text.count("left to the redrive") == 2
