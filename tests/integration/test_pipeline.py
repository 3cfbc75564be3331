"""Pipeline stages over a real ledger (SQLite), a real Milvus Lite server and the tiny model.

The broker is replaced by a recording dispatcher so each stage can be driven step by step; the
real-broker path is covered in tests/e2e.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from config.settings import Settings
from schemas.events import Action, ImageEvent
from schemas.tasks import EncodePayload, PreprocessPayload, SkuRefreshPayload
from tests.helpers import photo
from worker import encode_stage, pipeline, sku_refresh
from worker.dispatch import TASK_ENCODE, TASK_PREPROCESS, TASK_REFRESH_SKU, Dispatcher
from worker.index.lite_server import free_port
from worker.ledger import upgrade
from worker.runtime import Runtime


class RecordingDispatcher(Dispatcher):
    """Collects what would be published, per task name."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(app=None, queues=settings.queues)  # type: ignore[arg-type]
        self.sent: list[tuple[str, dict, float | None]] = []

    def _send(self, name: str, body: dict, queue: str, countdown: float | None) -> None:
        self.sent.append((name, body, countdown))

    def _send_many(self, name: str, bodies: list[dict], queue: str) -> None:
        for body in bodies:
            self._send(name, body, queue, None)

    def take(self, name: str) -> list[tuple[dict, float | None]]:
        out = [(b, c) for n, b, c in self.sent if n == name]
        self.sent = [s for s in self.sent if s[0] != name]
        return out


@pytest.fixture
def env(make_settings, milvus_uri: str, tmp_path: Path, tiny_encoder):
    # each test: its own home and its own Milvus collections (a unique SKU prefix keeps data apart)
    settings = make_settings(milvus_uri=milvus_uri, max_retries=2)
    upgrade(settings.effective_database_url)
    rt = Runtime(settings)
    rt.__dict__["encoder"] = tiny_encoder  # share the loaded model between tests
    return settings, rt, RecordingDispatcher(settings)


def write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(160, 120, seed=seed).save(path, quality=90)
    return path


def run_until_idle(rt: Runtime, d: RecordingDispatcher) -> None:
    """Drain what the stages publish: preprocess, encode (one batch), SKU refreshes."""
    for _ in range(10):
        for body, _ in d.take(TASK_PREPROCESS):
            pipeline.preprocess(rt, d, PreprocessPayload.model_validate(body))
        enc = [EncodePayload.model_validate(b) for b, _ in d.take(TASK_ENCODE)]
        if enc:
            encode_stage.encode_batch(rt, d, enc)
        for body, _ in d.take(TASK_REFRESH_SKU):
            sku_refresh.refresh_skus(rt, SkuRefreshPayload.model_validate(body).all_skus)
        if not d.sent:
            return


def test_index_refresh_and_unchanged(env, tmp_path: Path) -> None:
    """preprocess → encode → SKU refresh writes vectors; the same content again is 'unchanged'."""
    settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    events = [ImageEvent(uri=str(write_image(tmp_path / sku / f"{i}.jpg", i)), sku=sku) for i in range(3)]
    for e in events:
        d.preprocess(PreprocessPayload(event=e, request_id="r1"))
    run_until_idle(rt, d)
    names = rt.names()
    vecs = rt.store.image_vectors(names.images, [e.image_id for e in events])
    assert len(vecs) == 3
    sku_row = rt.store.get_skus(names.skus, [sku])[0]
    mean = np.mean([vecs[e.image_id] for e in events], axis=0)
    np.testing.assert_allclose(sku_row["vector"], mean / np.linalg.norm(mean), atol=1e-5)
    assert sku_row["image_count"] == 3
    again = ImageEvent(uri=events[0].uri, sku=sku)
    assert pipeline.preprocess(rt, d, PreprocessPayload(event=again, request_id="r2")) == "unchanged"
    assert d.sent == []
    assert rt.ledger.get(again.image_id).outcome == "unchanged"  # type: ignore[union-attr]


def test_missing_pixels_are_recomputed(env, tmp_path: Path) -> None:
    """An encode whose pixel entry expired re-runs preprocessing instead of failing the image."""
    settings, rt, d = env
    e = ImageEvent(uri=str(write_image(tmp_path / "S" / "a.jpg", 7)), sku=f"S-{uuid.uuid4().hex[:6]}")
    pipeline.preprocess(rt, d, PreprocessPayload(event=e))
    (body, _), = d.take(TASK_ENCODE)
    payload = EncodePayload.model_validate(body)
    rt.pixels.delete(payload.pixel_key)
    result = encode_stage.encode_batch(rt, d, [payload])
    assert result.indexed == 1
    assert rt.ledger.get(e.image_id).state == "indexed"  # type: ignore[union-attr]


def test_bad_item_does_not_fail_batch_mates(env, tmp_path: Path) -> None:
    """In one batch, an item whose file vanished fails (not_found) and the others are indexed."""
    settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    files = [write_image(tmp_path / sku / f"{i}.jpg", 20 + i) for i in range(4)]
    events = [ImageEvent(uri=str(f), sku=sku) for f in files]
    for e in events:
        pipeline.preprocess(rt, d, PreprocessPayload(event=e))
    payloads = [EncodePayload.model_validate(b) for b, _ in d.take(TASK_ENCODE)]
    rt.pixels.delete(payloads[1].pixel_key)
    files[1].unlink()
    result = encode_stage.encode_batch(rt, d, payloads)
    assert (result.indexed, result.failed) == (3, 1)
    row = rt.ledger.get(events[1].image_id)
    assert row is not None and (row.state, row.reason) == ("failed", "not_found")


def test_milvus_down_retries_with_backoff_then_gives_up(env, tmp_path: Path, make_settings) -> None:
    """Milvus unreachable: each item is re-published with a delay; past the retry limit it is
    recorded as retries_exhausted and nothing is marked indexed."""
    settings, rt, d = env
    dead = Runtime(make_settings(milvus_uri=f"http://127.0.0.1:{free_port()}", max_retries=2))
    dead.__dict__["encoder"] = rt.encoder
    e = ImageEvent(uri=str(write_image(tmp_path / "S" / "m.jpg", 3)), sku="S-dead")
    pipeline.preprocess(dead, d, PreprocessPayload(event=e))
    (body, _), = d.take(TASK_ENCODE)
    payload = EncodePayload.model_validate(body)
    from worker.metrics import metrics

    retries = metrics().retries.labels("index_unavailable")
    before = retries._value.get()
    for attempt in range(2):
        result = encode_stage.encode_batch(dead, d, [payload])
        assert result.retried == 1
        (body, countdown), = d.take(TASK_ENCODE)
        payload = EncodePayload.model_validate(body)
        assert payload.attempt == attempt + 1 and countdown and countdown > 0
        assert dead.ledger.get(e.image_id).state == "pending"  # type: ignore[union-attr]
    result = encode_stage.encode_batch(dead, d, [payload])
    assert result.failed == 1
    row = dead.ledger.get(e.image_id)
    assert row is not None and (row.state, row.reason) == ("failed", "retries_exhausted")
    assert "index_unavailable" in (row.detail or "")
    assert retries._value.get() == before + 2  # each retry counted by its reason (the give-up is a failure)


def test_collections_dropped_under_a_running_worker_are_made_again(make_settings, tiny_encoder, tmp_path: Path) -> None:
    """The serving collections and aliases vanish while a worker runs (dropped by hand, a Milvus
    restored from an older backup): the worker's next write fails, it forgets the collections it
    knew, and the retry makes them again, so the image is indexed (it kept writing to the missing
    collection until the image ended failed, retries_exhausted). Its own Milvus server: the
    test drops collections."""
    from pymilvus import MilvusClient

    from worker.index import IMAGES_ALIAS, SKUS_ALIAS, LiteServer

    server = LiteServer(tmp_path / "milvus")
    server.start()
    try:
        settings = make_settings(milvus_uri=server.uri, max_retries=2)
        upgrade(settings.effective_database_url)
        rt, d = Runtime(settings), RecordingDispatcher(settings)
        rt.__dict__["encoder"] = tiny_encoder
        first = ImageEvent(uri=str(write_image(tmp_path / "S" / "a.jpg", 1)), sku="S")
        d.preprocess(PreprocessPayload(event=first))
        run_until_idle(rt, d)
        names = rt.names()
        client = MilvusClient(uri=server.uri)
        for alias in (IMAGES_ALIAS, SKUS_ALIAS):
            client.drop_alias(alias)
        for coll in (names.images, names.skus):
            client.drop_collection(coll)
        second = ImageEvent(uri=str(write_image(tmp_path / "S" / "b.jpg", 2)), sku="S")
        d.preprocess(PreprocessPayload(event=second))
        run_until_idle(rt, d)
        row = rt.ledger.get(second.image_id)
        assert row is not None and row.state == "indexed", (row.state, row.reason, row.detail) if row else None
        assert set(rt.store.image_vectors(IMAGES_ALIAS, [second.image_id])) == {second.image_id}
        assert rt.store.get_skus(SKUS_ALIAS, ["S"])[0]["image_count"] == 1  # the new collection holds b alone
        client.close()
    finally:
        server.stop()


def test_a_server_that_never_answers_ends_fetch_timeout(env, make_settings, milvus_uri: str) -> None:
    """An image whose server accepts and never answers is retried with backoff (counted under
    fetch_timeout), then recorded failed with reason fetch_timeout, the contract's code for it, not
    the generic retries_exhausted; its failure is counted under that reason."""
    import http.server
    import time

    from tests.helpers import http_server
    from worker.errors import TransientError
    from worker.metrics import metrics

    class Hang(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            time.sleep(3)

        def log_message(self, *args: object) -> None:
            pass

    _, rt, d = env
    with http_server(Hang) as base:
        slow = Runtime(make_settings(milvus_uri=milvus_uri, max_retries=1, fetch_read_timeout=0.3,
                                     fetch_deadline=1.0, fetch_allow_hosts=["127.0.0.1"]))  # fmt: skip
        slow.__dict__["encoder"] = rt.encoder
        e = ImageEvent(uri=f"{base}/SKU-T/hang.jpg", sku=f"S-{uuid.uuid4().hex[:6]}")
        failures = metrics().failures.labels("fetch_timeout")
        before = failures._value.get()

        def run(payload: PreprocessPayload) -> str:  # as the preprocess task does
            with pytest.raises(TransientError) as info:
                pipeline.preprocess(slow, d, payload)
            assert info.value.reason == "fetch_timeout"
            return pipeline.record_failure(slow, d, payload, info.value)

        assert run(PreprocessPayload(event=e)) == "retried"
        (body, countdown), = d.take(TASK_PREPROCESS)
        assert countdown and countdown > 0
        assert run(PreprocessPayload.model_validate(body)) == "failed"
    row = slow.ledger.get(e.image_id)
    assert row is not None and (row.state, row.reason) == ("failed", "fetch_timeout")
    assert row.detail and row.detail.startswith("2 attempts; last: fetch_timeout")
    assert failures._value.get() == before + 1


def test_delete_removes_vector_and_sku(env, tmp_path: Path) -> None:
    """A delete event removes the image vector; the SKU left without images is removed too."""
    settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    e = ImageEvent(uri=str(write_image(tmp_path / sku / "x.jpg", 9)), sku=sku)
    pipeline.preprocess(rt, d, PreprocessPayload(event=e))
    run_until_idle(rt, d)
    names = rt.names()
    assert rt.store.get_skus(names.skus, [sku])
    gone = ImageEvent(uri=e.uri, sku=sku, action=Action.delete)
    assert pipeline.preprocess(rt, d, PreprocessPayload(event=gone)) == "deleted"
    run_until_idle(rt, d)
    assert rt.store.image_vectors(names.images, [e.image_id]) == {}
    assert rt.store.get_skus(names.skus, [sku]) == []


def test_a_delete_sent_again_from_the_ledger_deletes(env, tmp_path: Path) -> None:
    """A delete whose worker died after recording it: the ledger's replay of the image (redrive,
    failures replay, reindex) is that delete, never an upsert of the file still in storage; and a
    background build of another model skips it."""
    settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    e = ImageEvent(uri=str(write_image(tmp_path / sku / "z.jpg", 12)), sku=sku)
    pipeline.preprocess(rt, d, PreprocessPayload(event=e))
    run_until_idle(rt, d)
    names = rt.names()
    assert rt.ledger.accept(ImageEvent(uri=e.uri, sku=sku, action=Action.delete), "req-del").current  # then died
    replay = rt.ledger.get(e.image_id).event("redrive")
    build = PreprocessPayload(event=replay, models=[rt.serving().model_id])
    assert pipeline.preprocess(rt, d, build) == "stale"
    assert pipeline.preprocess(rt, d, PreprocessPayload(event=replay, request_id="req-del")) == "deleted"
    run_until_idle(rt, d)
    assert rt.ledger.get(e.image_id).state == "deleted"
    assert rt.store.image_vectors(names.images, [e.image_id]) == {}
    assert rt.store.get_skus(names.skus, [sku]) == []


def test_encode_after_delete_does_not_resurrect(env, tmp_path: Path) -> None:
    """An encode of an older version that finishes after a delete never writes the vector back."""
    settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    e = ImageEvent(uri=str(write_image(tmp_path / sku / "y.jpg", 11)), sku=sku)
    pipeline.preprocess(rt, d, PreprocessPayload(event=e))
    (body, _), = d.take(TASK_ENCODE)
    pipeline.preprocess(rt, d, PreprocessPayload(event=ImageEvent(uri=e.uri, sku=sku, action=Action.delete)))
    result = encode_stage.encode_batch(rt, d, [EncodePayload.model_validate(body)])
    assert result.indexed == 0
    assert rt.store.image_vectors(rt.names().images, [e.image_id]) == {}


def test_an_image_query_is_prepared_as_the_image_was_indexed(env, milvus_uri: str, tmp_path: Path) -> None:
    """Searching with an indexed file finds it with cosine 1: the query gets the same border trim
    (and reduced-scale decode) as indexing (it scored 0.998 against itself when it did not)."""
    from PIL import Image

    from worker.search import run_search

    settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    framed = Image.new("RGB", (400, 300), (255, 255, 255))
    framed.paste(photo(200, 150, seed=21), (90, 70))  # a product on a white studio backdrop
    path = tmp_path / sku / "framed.jpg"
    path.parent.mkdir(parents=True)
    framed.save(path, quality=95)
    pipeline.preprocess(rt, d, PreprocessPayload(event=ImageEvent(uri=str(path), sku=sku)))
    run_until_idle(rt, d)
    hits = run_search(settings, milvus_uri, image=path, text=None, skus=False, limit=1, encoder=rt.encoder)
    assert hits[0].uri == ImageEvent(uri=str(path), sku=sku).uri
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[0].score <= 1.0  # a cosine, float32 rounding included


def test_auto_trim_setting(env, make_settings, milvus_uri: str, tmp_path: Path) -> None:
    """A product on a white backdrop is trimmed before the model sees it, unless IMGSYNC_AUTO_TRIM is off."""
    from PIL import Image

    settings, rt, d = env
    canvas = Image.new("RGB", (400, 300), (255, 255, 255))
    canvas.paste(photo(80, 60, seed=5), (160, 120))
    path = tmp_path / "white.jpg"
    canvas.save(path, quality=95)
    data = path.read_bytes()
    trimmed = pipeline.model_pixels(rt, data, None)
    off = Runtime(make_settings(milvus_uri=milvus_uri, auto_trim=False))
    off.__dict__["encoder"] = rt.encoder
    untrimmed = pipeline.model_pixels(off, data, None)
    white = lambda px: float((px.astype(int).min(axis=2) > 245).mean())  # noqa: E731
    assert white(untrimmed) > 0.8 > 0.3 > white(trimmed)


def test_image_moving_to_another_sku_refreshes_both(env, tmp_path: Path) -> None:
    """An image re-filed under another SKU is re-encoded under it, and the SKU it left is refreshed."""
    settings, rt, d = env
    old, new = f"OLD-{uuid.uuid4().hex[:6]}", f"NEW-{uuid.uuid4().hex[:6]}"
    a = write_image(tmp_path / "m" / "a.jpg", 31)
    b = write_image(tmp_path / "m" / "b.jpg", 32)
    for f in (a, b):
        d.preprocess(PreprocessPayload(event=ImageEvent(uri=str(f), sku=old)))
    run_until_idle(rt, d)
    names = rt.names()
    assert rt.store.get_skus(names.skus, [old])[0]["image_count"] == 2
    d.preprocess(PreprocessPayload(event=ImageEvent(uri=str(a), sku=new)))
    run_until_idle(rt, d)
    assert rt.store.get_skus(names.skus, [old])[0]["image_count"] == 1
    assert rt.store.get_skus(names.skus, [new])[0]["image_count"] == 1
    assert rt.ledger.sku_counts()[1] == 0


def test_unchanged_local_images_are_settled_without_a_message(env, tmp_path: Path) -> None:
    """Submitting a local catalog again records its unchanged images at once (no broker message, no
    decode, no forward pass); changed, new, unreadable and remote images are still published."""
    settings, rt, d = env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    files = [write_image(tmp_path / sku / f"{i}.jpg", 40 + i) for i in range(4)]
    for f in files:
        d.preprocess(PreprocessPayload(event=ImageEvent(uri=str(f), sku=sku), request_id="r1"))
    run_until_idle(rt, d)
    write_image(files[1], 99)  # changed content
    files[2].unlink()  # gone: the worker must record not_found
    new = write_image(tmp_path / sku / "new.jpg", 77)
    events = [ImageEvent(uri=str(f), sku=sku) for f in [*files, new]]
    events.append(ImageEvent(uri="https://example.com/x.jpg", sku=sku))
    events.append(ImageEvent(uri=str(files[3]), sku="OTHER"))  # moved to another SKU
    rest = pipeline.settle_unchanged(rt, events, "r2")
    assert [e.uri for e in rest] == [events[i].uri for i in (1, 2, 4, 5, 6)]
    row = rt.ledger.get(events[0].image_id)
    assert row is not None and row.outcome == "unchanged" and row.request_id == "r2" and row.state == "indexed"
    assert row.version == events[0].version  # the newer event was accepted, not dropped
    assert d.sent == []
    older = ImageEvent(uri=str(files[0]), sku=sku, version=1)  # an old event replayed: stale, nothing to do
    assert pipeline.settle_unchanged(rt, [older], "r3") == [older]  # the worker short-circuits it as stale


def test_one_encode_batch_refreshes_its_skus_with_one_message(env, tmp_path: Path) -> None:
    """An encode batch over several SKUs sends one refresh message naming them all; that refresh writes
    each SKU's own mean with one membership query, one vector fetch and one upsert for all of them."""
    settings, rt, d = env
    skus = [f"S-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    events = [
        ImageEvent(uri=str(write_image(tmp_path / sku / f"{i}.jpg", 100 * n + i)), sku=sku)
        for n, sku in enumerate(skus)
        for i in range(n + 1)
    ]
    for e in events:
        pipeline.preprocess(rt, d, PreprocessPayload(event=e))
    enc = [EncodePayload.model_validate(b) for b, _ in d.take(TASK_ENCODE)]
    assert encode_stage.encode_batch(rt, d, enc).indexed == len(events)
    ((body, countdown),) = d.take(TASK_REFRESH_SKU)
    payload = SkuRefreshPayload.model_validate(body)
    assert payload.all_skus == sorted(skus) and countdown == pytest.approx(0.5)
    calls: list[str] = []
    for name in ("sku_members_many", "sku_members"):
        original = getattr(rt.ledger, name)
        setattr(rt.ledger, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    for name in ("image_vectors", "upsert_skus", "upsert_sku"):
        original = getattr(rt.store, name)
        setattr(rt.store, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    assert sku_refresh.refresh_skus(rt, payload.all_skus) == dict.fromkeys(skus, "written")
    assert sorted(calls) == ["image_vectors", "sku_members_many", "upsert_skus"]
    names = rt.names()
    vecs = rt.store.image_vectors(names.images, [e.image_id for e in events])
    for sku in skus:
        members = [vecs[e.image_id] for e in events if e.sku == sku]
        (row,) = rt.store.get_skus(names.skus, [sku])
        mean = np.mean(members, axis=0)
        np.testing.assert_allclose(row["vector"], mean / np.linalg.norm(mean), atol=1e-5)
        assert row["image_count"] == len(members)
    assert rt.ledger.sku_counts()[1] == 0
    # again: every SKU is clean, nothing is read or written
    calls.clear()
    assert sku_refresh.refresh_skus(rt, skus) == dict.fromkeys(skus, "clean")
    assert calls == []


def _two_skus_indexed(
    rt: Runtime, d: RecordingDispatcher, root: Path, seeds: tuple[int, int]
) -> list[tuple[str, ImageEvent]]:
    """Two new SKUs of one image each, preprocessed and encoded; their refresh message is left queued."""
    out = []
    for name, seed in zip("ab", seeds, strict=True):
        sku = f"S-{uuid.uuid4().hex[:6]}"
        e = ImageEvent(uri=str(write_image(root / sku / f"{name}.jpg", seed)), sku=sku)
        pipeline.preprocess(rt, d, PreprocessPayload(event=e))
        out.append((sku, e))
    encode_stage.encode_batch(rt, d, [EncodePayload.model_validate(x) for x, _ in d.take(TASK_ENCODE)])
    return out


def test_a_batch_refresh_writes_some_skus_and_deletes_emptied_ones(env, tmp_path: Path) -> None:
    settings, rt, d = env
    (keep, _a), (empty, b) = _two_skus_indexed(rt, d, tmp_path, seeds=(1, 2))
    run_until_idle(rt, d)  # their SKU vectors written
    names = rt.names()
    assert len(rt.store.get_skus(names.skus, [keep, empty])) == 2
    assert pipeline.preprocess(rt, d, PreprocessPayload(event=ImageEvent(uri=b.uri, sku=empty, action=Action.delete))) == "deleted"
    d.take(TASK_REFRESH_SKU)
    rt.ledger.mark_dirty([keep])  # both dirty, refreshed together
    assert sku_refresh.refresh_skus(rt, [keep, empty]) == {keep: "written", empty: "deleted"}
    assert [r["sku"] for r in rt.store.get_skus(names.skus, [keep, empty])] == [keep]
    assert rt.ledger.sku_counts()[1] == 0


def test_a_sku_changing_during_a_batch_refresh_is_computed_again(env, tmp_path: Path) -> None:
    """The generation check per SKU: one that changed after its generation was read is recomputed in
    the next round, with the newest membership; the others are not."""
    settings, rt, d = env
    (one, _a), (two, _b) = _two_skus_indexed(rt, d, tmp_path, seeds=(3, 4))
    d.take(TASK_REFRESH_SKU)
    rounds: list[list[str]] = []
    original = rt.ledger.sku_members_many

    def members(sku_ids, model_id):  # type: ignore[no-untyped-def]
        rounds.append(list(sku_ids))
        if len(rounds) == 1:
            rt.ledger.mark_dirty([two])  # a change lands while the first round computes
        return original(sku_ids, model_id)

    rt.ledger.sku_members_many = members  # type: ignore[method-assign]
    assert sku_refresh.refresh_skus(rt, [one, two]) == {one: "written", two: "written"}
    assert rounds == [sorted([one, two]), [two]]
    assert rt.ledger.sku_counts()[1] == 0
