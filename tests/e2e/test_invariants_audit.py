"""Invariants audit: a stale encode (one that started before a newer event was accepted) never
leaves its vector behind for a failed, deleted or reverted image. Driven stage by stage over a real
ledger, Milvus Lite server and the tiny model, interleaving the steps the way concurrent workers can."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from schemas.events import Action, ImageEvent
from schemas.tasks import EncodePayload, PreprocessPayload
from tests.integration.test_pipeline import RecordingDispatcher, run_until_idle, write_image
from worker import encode_stage, pipeline
from worker.dispatch import TASK_ENCODE, TASK_PREPROCESS
from worker.encoders.base import l2_normalize
from worker.errors import ImgsyncError
from worker.ledger import upgrade
from worker.runtime import Runtime

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, make_settings, milvus_uri: str, tiny_encoder):
    """Settings, a runtime (own home, shared Milvus server and model) and a recording dispatcher;
    the ledger in the home's SQLite file or in a fresh PostgreSQL database."""
    db = {"database_url": request.getfixturevalue("pg_database")()} if request.param == "postgresql" else {}
    settings = make_settings(milvus_uri=milvus_uri, max_retries=2, **db)
    upgrade(settings.effective_database_url)
    rt = Runtime(settings)
    rt.__dict__["encoder"] = tiny_encoder
    return settings, rt, RecordingDispatcher(settings)


def _process(rt: Runtime, d: RecordingDispatcher, event: ImageEvent) -> str:
    """One preprocess message as the task runs it: a typed error is recorded."""
    payload = PreprocessPayload(event=event, request_id=uuid.uuid4().hex)
    try:
        return pipeline.preprocess(rt, d, payload)
    except ImgsyncError as exc:
        return pipeline.record_failure(rt, d, payload, exc)


def _indexed(rt: Runtime, d: RecordingDispatcher, path: Path, sku: str, version: int) -> ImageEvent:
    ev = ImageEvent(uri=str(path), sku=sku, version=f"{version:040d}")
    _process(rt, d, ev)
    run_until_idle(rt, d)
    assert rt.ledger.get(ev.image_id).state == "indexed"  # type: ignore[union-attr]
    return ev


def _started_encode(rt: Runtime, d: RecordingDispatcher, ev: ImageEvent) -> encode_stage.StartedEncode:
    """Preprocess ``ev`` and start its encode (version checked, forward pass queued), not written yet."""
    assert _process(rt, d, ev) == "queued"
    ((body, _),) = d.take(TASK_ENCODE)
    return encode_stage.start_encode(rt, d, [EncodePayload.model_validate(body)])


def _overtaken_encode(
    rt: Runtime, d: RecordingDispatcher, tmp_path: Path, name: str, seed: int
) -> tuple[str, Path, ImageEvent, encode_stage.StartedEncode]:
    """An image of a new SKU indexed at version 1, then changed, and its version 2 encode started
    (not written yet): ``(sku, path, version 1's event, started encode)``."""
    sku = f"S-{uuid.uuid4().hex[:6]}"
    path = write_image(tmp_path / sku / name, seed)
    ev1 = _indexed(rt, d, path, sku, 1)
    write_image(path, seed + 1)
    return sku, path, ev1, _started_encode(rt, d, ImageEvent(uri=ev1.uri, sku=sku, version=f"{2:040d}"))


def _assert_true(rt: Runtime, image_id: str, sku: str) -> None:
    """Milvus holds exactly what the ledger says: the indexed image's current content, nothing for
    another state, and the SKU vector is the mean of its members."""
    names = rt.names()
    row = rt.ledger.get(image_id)
    got = rt.store.get_images(names.images, [image_id])
    if row is None or row.state != "indexed":
        assert got == [], f"{row.state if row else None} image still has a vector"
    else:
        assert len(got) == 1 and got[0]["content_hash"] == row.content_hash, "vector missing or stale in Milvus"
        pixels = pipeline.model_pixels(rt, Path(row.uri.removeprefix("file://")).read_bytes(), None)
        want = rt.encoder.encode([pixels])[0]
        assert np.allclose(np.asarray(got[0]["vector"]), want, atol=1e-4), "vector is not the current content's"
    members = rt.ledger.sku_members(sku, rt.serving().model_id)
    skus = rt.store.get_skus(names.skus, [sku])
    if not members:
        assert skus == []
    else:
        vecs = rt.store.image_vectors(names.images, members)
        mean = l2_normalize(np.mean(np.stack([vecs[i] for i in members]), axis=0))
        assert np.allclose(np.asarray(skus[0]["vector"]), mean, atol=1e-5)


@pytest.mark.parametrize("newer_first", [False, True])
def test_a_stale_encode_never_outlives_a_revert_to_indexed_content(env, tmp_path: Path, newer_first: bool) -> None:
    """X indexed; Y's encode starts; the file goes back to X (a newer event, 'unchanged'); Y's write
    lands after the newer event was accepted: Milvus ends with X's vector, not Y's."""
    _settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    path = write_image(tmp_path / sku / "a.jpg", 1)
    x = path.read_bytes()
    ev1 = _indexed(rt, d, path, sku, 1)
    write_image(path, 2)
    started = _started_encode(rt, d, ImageEvent(uri=ev1.uri, sku=sku, version=f"{2:040d}"))
    path.write_bytes(x)  # reverted
    pipeline.submit(rt.ledger, d, [ImageEvent(uri=ev1.uri, sku=sku, version=f"{3:040d}")], "r3")
    if newer_first:
        for body, _ in d.take(TASK_PREPROCESS):
            assert pipeline.preprocess(rt, d, PreprocessPayload.model_validate(body)) == "unchanged"
    encode_stage.finish_encode(rt, d, started)
    run_until_idle(rt, d)
    _assert_true(rt, ev1.image_id, sku)


def test_a_stale_encode_never_revives_a_failed_image(env, tmp_path: Path) -> None:
    """An older encode written after the image's newer version failed leaves no vector behind."""
    _settings, rt, d = env
    sku, path, ev1, started = _overtaken_encode(rt, d, tmp_path, "b.jpg", 3)
    path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 10)
    assert _process(rt, d, ImageEvent(uri=ev1.uri, sku=sku, version=f"{3:040d}")) == "failed"
    encode_stage.finish_encode(rt, d, started)
    run_until_idle(rt, d)
    assert rt.ledger.get(ev1.image_id).state == "failed"  # type: ignore[union-attr]
    _assert_true(rt, ev1.image_id, sku)


def test_a_stale_encode_written_while_a_delete_runs_does_not_resurrect(env, tmp_path: Path) -> None:
    """An older encode written between a delete's vector removal and its ledger record leaves no
    vector behind (its record already sees the delete as the image's newest event)."""
    _settings, rt, d = env
    sku, path, ev1, started = _overtaken_encode(rt, d, tmp_path, "c.jpg", 5)
    gone = ImageEvent(uri=ev1.uri, sku=sku, action=Action.delete, version=f"{3:040d}")
    assert rt.ledger.accept(gone, "r3").current
    pipeline.remove_vectors(rt, [gone.image_id])  # delete_image, first half
    encode_stage.finish_encode(rt, d, started)  # the stale write lands in between
    assert rt.ledger.mark_deleted(gone.image_id, gone.version) == sku  # delete_image, second half
    d.refresh_sku(sku)
    run_until_idle(rt, d)
    _assert_true(rt, ev1.image_id, sku)


def test_a_recreate_during_a_delete_is_indexed_again(env, tmp_path: Path) -> None:
    """A delete removes the vectors; the same bytes are put back (a newer upsert, accepted and found
    'unchanged') before the delete is recorded: the re-created image ends indexed with its vector."""
    _settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    path = write_image(tmp_path / sku / "d.jpg", 7)
    ev1 = _indexed(rt, d, path, sku, 1)
    again = ImageEvent(uri=ev1.uri, sku=sku, version=f"{3:040d}")
    real_delete = rt.store.delete_images

    def delete_then_recreate(collection: str, image_ids) -> None:  # type: ignore[no-untyped-def]
        real_delete(collection, image_ids)
        rt.store.delete_images = real_delete  # once
        assert _process(rt, d, again) in ("unchanged", "queued")

    rt.store.delete_images = delete_then_recreate
    gone = ImageEvent(uri=ev1.uri, sku=sku, action=Action.delete, version=f"{2:040d}")
    assert _process(rt, d, gone) == "deleted"
    run_until_idle(rt, d)
    assert rt.ledger.get(ev1.image_id).state == "indexed"  # type: ignore[union-attr]
    _assert_true(rt, ev1.image_id, sku)


def test_an_upsert_written_while_a_failure_removes_vectors_is_indexed_again(env, tmp_path: Path) -> None:
    """A broken file fails (recorded, then its vectors are removed); a newer upsert with good bytes is
    accepted, encoded and written before that removal runs: the removal took the newer vector, so the
    image is encoded again and ends indexed with its vector."""
    _settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    path = write_image(tmp_path / sku / "f.jpg", 11)
    good = path.read_bytes()
    ev1 = _indexed(rt, d, path, sku, 1)
    path.write_bytes(b"<html>not an image</html>")
    newer = ImageEvent(uri=ev1.uri, sku=sku, version=f"{3:040d}")
    real_delete = rt.store.delete_images

    def upsert_written_first(collection: str, image_ids) -> None:  # type: ignore[no-untyped-def]
        rt.store.delete_images = real_delete  # once
        path.write_bytes(good)
        assert _process(rt, d, newer) == "queued"
        run_until_idle(rt, d)  # the newer vector is written ...
        real_delete(collection, image_ids)  # ... and then removed by the failure's cleanup

    rt.store.delete_images = upsert_written_first
    broken = ImageEvent(uri=ev1.uri, sku=sku, version=f"{2:040d}")
    assert _process(rt, d, broken) == "failed"
    run_until_idle(rt, d)
    assert rt.ledger.get(ev1.image_id).state == "indexed"  # type: ignore[union-attr]
    _assert_true(rt, ev1.image_id, sku)


def _spy_upserts(rt: Runtime) -> list[tuple[str, str]]:
    """Record ``(image_id, content_hash)`` of every entity upserted into Milvus from now on."""
    sent: list[tuple[str, str]] = []
    real_upsert = rt.store.upsert_images

    def spy(names, entities, **kw):  # type: ignore[no-untyped-def]
        sent.extend((e.image_id, e.content_hash) for e in entities)
        return real_upsert(names, entities, **kw)

    rt.store.upsert_images = spy
    return sent


def test_a_stale_encode_finished_after_a_delete_and_a_recreate_writes_nothing(env, tmp_path: Path) -> None:
    """An encode started before its image was deleted and re-created finishes last: it writes
    nothing to Milvus (its version is no longer the image's newest), so the re-create's vector
    stays, and the image ends indexed with it."""
    _settings, rt, d = env
    sku, path, ev1, started = _overtaken_encode(rt, d, tmp_path, "e.jpg", 13)
    assert _process(rt, d, ImageEvent(uri=ev1.uri, sku=sku, action=Action.delete, version=f"{3:040d}")) == "deleted"
    assert _process(rt, d, ImageEvent(uri=ev1.uri, sku=sku, version=f"{4:040d}")) == "queued"
    run_until_idle(rt, d)
    sent = _spy_upserts(rt)
    result = encode_stage.finish_encode(rt, d, started)
    assert (result.indexed, result.skipped) == (0, 1) and sent == []
    run_until_idle(rt, d)
    assert rt.ledger.get(ev1.image_id).state == "indexed"  # type: ignore[union-attr]
    _assert_true(rt, ev1.image_id, sku)


def test_an_encode_of_a_version_that_failed_meanwhile_writes_nothing(env, tmp_path: Path) -> None:
    """Another copy of the same event failed the image (at the same version) while this copy was
    encoded: the claim leaves a failed image out, so no vector of it is written, nor recorded."""
    _settings, rt, d = env
    sku, path, ev1, started = _overtaken_encode(rt, d, tmp_path, "k.jpg", 31)
    ev2 = started.payloads[0].event
    path.write_bytes(b"\xff\xd8\xff\xe0 cut short")  # the other copy reads a broken file
    assert _process(rt, d, ev2) == "failed"
    sent = _spy_upserts(rt)
    result = encode_stage.finish_encode(rt, d, started)
    assert (result.indexed, result.skipped) == (0, 1) and sent == []
    run_until_idle(rt, d)
    assert rt.ledger.get(ev1.image_id).state == "failed"  # type: ignore[union-attr]
    assert rt.ledger.vector_rows(ev1.image_id) == {}
    _assert_true(rt, ev1.image_id, sku)


@pytest.mark.parametrize("third", [False, True])
def test_an_older_encode_waits_for_a_newer_write_and_never_overwrites_it(env, tmp_path: Path, third: bool) -> None:
    """Two encode workers cross: the newer one (version 3) has upserted its vector and not yet
    recorded it when the older one (version 2, started before version 3 was accepted) finishes.
    The older one waits for the newer one's claim on the image's row, then finds itself overtaken
    and writes nothing: Milvus keeps version 3's vector. ``third``: a fourth event with version 3's
    bytes comes after, and is judged unchanged (the vector it trusts is the right one)."""
    _settings, rt, d = env
    sku, path, ev1, older = _overtaken_encode(rt, d, tmp_path, "h.jpg", 21)
    write_image(path, 23)
    newer = _started_encode(rt, d, ImageEvent(uri=ev1.uri, sku=sku, version=f"{3:040d}"))
    newer_hash = newer.groups[0].live[0].content_hash
    upserted, go_on = threading.Event(), threading.Event()
    sent = _spy_upserts(rt)
    spied = rt.store.upsert_images

    def held_after_upsert(names, entities, **kw):  # type: ignore[no-untyped-def]
        spied(names, entities, **kw)
        if threading.current_thread().name == "newer":
            upserted.set()
            assert go_on.wait(30)

    rt.store.upsert_images = held_after_upsert
    results: dict[str, encode_stage.EncodeResult] = {}

    def finish(name: str, started: encode_stage.StartedEncode) -> None:
        results[name] = encode_stage.finish_encode(rt, d, started)

    writers = {n: threading.Thread(target=finish, args=(n, s), name=n) for n, s in (("newer", newer), ("older", older))}
    writers["newer"].start()
    assert upserted.wait(30)
    writers["older"].start()
    writers["older"].join(1.0)
    assert writers["older"].is_alive(), "the older encode did not wait for the newer one's claim"
    go_on.set()
    for t in writers.values():
        t.join(30)
    assert (results["newer"].indexed, results["older"].indexed, results["older"].skipped) == (1, 0, 1)
    assert sent == [(ev1.image_id, newer_hash)]
    if third:
        assert _process(rt, d, ImageEvent(uri=ev1.uri, sku=sku, version=f"{4:040d}")) == "unchanged"
    run_until_idle(rt, d)
    assert rt.ledger.get(ev1.image_id).content_hash == newer_hash  # type: ignore[union-attr]
    _assert_true(rt, ev1.image_id, sku)


def test_one_event_delivered_twice_into_a_batch_is_upserted_once(env, tmp_path: Path) -> None:
    """The same event twice in one encode batch (at-least-once delivery): one entity per image in the
    upsert (a primary key twice in one request is undefined), both pixel entries dropped."""
    _settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    path = write_image(tmp_path / sku / "g.jpg", 15)
    ev = ImageEvent(uri=str(path), sku=sku, version=f"{1:040d}")
    assert _process(rt, d, ev) == "queued"
    assert _process(rt, d, ev) == "queued"
    bodies = d.take(TASK_ENCODE)
    assert len(bodies) == 2
    payloads = [EncodePayload.model_validate(body) for body, _ in bodies]
    sent = _spy_upserts(rt)
    encode_stage.encode_batch(rt, d, payloads)
    run_until_idle(rt, d)
    assert [i for i, _ in sent] == [ev.image_id]
    assert all(rt.pixels.get(p.pixel_key) is None for p in payloads)
    assert rt.ledger.get(ev.image_id).state == "indexed"  # type: ignore[union-attr]
    _assert_true(rt, ev.image_id, sku)
