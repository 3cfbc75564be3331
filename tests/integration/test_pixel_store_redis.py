"""The Redis pixel store on a real Redis: lossless round trip, every entry with a TTL, expiry or
eviction makes encode redo the preprocessing (same vector), an unreachable Redis is a transient error
on put and a missing entry on get."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from config.settings import Settings
from schemas.events import ImageEvent
from schemas.tasks import EncodePayload, PreprocessPayload
from tests.conftest import REDIS_URL
from tests.integration.test_pipeline import RecordingDispatcher, write_image
from worker import encode_stage, pipeline
from worker.dispatch import TASK_ENCODE
from worker.errors import TransientError
from worker.index.lite_server import free_port
from worker.ledger import upgrade
from worker.pixels import DirectoryPixelStore, RedisPixelStore, open_pixel_store
from worker.runtime import Runtime


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(31, 17, 3), dtype=np.uint8)


def test_round_trip_is_lossless_and_every_entry_expires() -> None:
    store = RedisPixelStore(REDIS_URL, ttl_seconds=120)
    arr = _pixels(1)
    arr[0, 0] = (0, 255, 0)
    key = store.put(arr)
    out = store.get(key)
    assert out is not None and out.dtype == np.uint8 and np.array_equal(out, arr)
    ttl = store.client.ttl(store.prefix + key)
    assert 0 < ttl <= 120  # never an entry without expiry
    store.delete(key)
    assert store.get(key) is None and store.client.exists(store.prefix + key) == 0
    store.delete(key)  # twice: no error
    assert store.get("../etc/passwd") is None  # keys are only ever hex
    store.close()


def test_jpeg_handoff_round_trip_expires_too() -> None:
    """A JPEG handed to the encode stage through Redis: same bytes and orientation, and a TTL."""
    from worker.imaging.device_decode import JpegHandoff

    store = RedisPixelStore(REDIS_URL, ttl_seconds=120)
    handoff = JpegHandoff(data=b"\xff\xd8\xff" + bytes(range(256)) * 64 + b"\xff\xd9", orientation=6, width=1200, height=900)
    key = store.put(handoff)
    assert store.get(key) == handoff
    assert 0 < store.client.ttl(store.prefix + key) <= 120
    store.delete(key)


def test_expired_entry_reads_as_missing() -> None:
    store = RedisPixelStore(REDIS_URL, ttl_seconds=120)
    key = store.put(_pixels(2))
    store.client.pexpire(store.prefix + key, 1)
    time.sleep(0.05)
    assert store.get(key) is None
    store.close()


def test_unreachable_redis_is_transient_on_put_and_missing_on_get() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    store = RedisPixelStore(url, ttl_seconds=120)
    with pytest.raises(TransientError) as err:
        store.put(_pixels(3))
    assert err.value.reason == "internal_error" and "secret" not in str(err.value)
    assert store.get("0" * 32) is None
    store.delete("0" * 32)  # no error: the TTL would have removed it anyway


def test_many_entries_are_read_and_deleted_in_few_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    """``get_many`` answers each key in order (a missing or path-like key as None) with one MGET per
    MANY_CHUNK keys; ``delete_many`` removes them with one DEL per chunk."""
    store = RedisPixelStore(REDIS_URL, ttl_seconds=120)
    monkeypatch.setattr(RedisPixelStore, "MANY_CHUNK", 4)
    arrays = [_pixels(10 + i) for i in range(9)]
    keys = [store.put(a) for a in arrays]
    calls: list[str] = []
    real = store.client.execute_command
    monkeypatch.setattr(store.client, "execute_command", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    asked = [*keys[:5], "0" * 32, "../x", *keys[5:]]
    got = store.get_many(asked)
    assert [c for c in calls] == ["MGET"] * 3  # 9 valid keys, 4 per MGET
    assert got[5] is None and got[6] is None
    assert all(np.array_equal(g, a) for g, a in zip(got[:5] + got[7:], arrays, strict=True))  # type: ignore[arg-type]
    calls.clear()
    store.delete_many(asked)
    assert calls == ["DEL"] * 3
    assert store.get_many(keys) == [None] * 9 and store.client.exists(*[store.prefix + k for k in keys]) == 0
    store.close()


def test_unreachable_redis_reads_many_as_missing() -> None:
    """Fault injected: Redis gone. ``get_many`` answers every entry missing (encode re-preprocesses)
    and ``delete_many`` does not raise (the TTL removes the entries)."""
    store = RedisPixelStore(f"redis://127.0.0.1:{free_port()}/0", ttl_seconds=120)
    assert store.get_many(["0" * 32, "1" * 32]) == [None, None]
    store.delete_many(["0" * 32, "1" * 32])


def test_store_choice_follows_settings(tmp_path: Path) -> None:
    base = {"_env_file": None, "home": tmp_path}
    assert Settings(**base).effective_pixel_store == str(tmp_path / "pixels")
    assert Settings(**base, broker_url=REDIS_URL).effective_pixel_store == REDIS_URL
    amqp = Settings(**base, broker_url="amqp://guest@localhost//")
    assert amqp.effective_pixel_store == str(tmp_path / "pixels")
    assert Settings(**base, broker_url="amqp://x//", pixel_store_url=REDIS_URL).effective_pixel_store == REDIS_URL
    assert isinstance(open_pixel_store(REDIS_URL, 60), RedisPixelStore)
    assert isinstance(open_pixel_store(str(tmp_path / "px"), 60), DirectoryPixelStore)
    with pytest.raises(ValueError, match="redis://"):
        Settings(**base, pixel_store_url="s3://bucket/px")


@pytest.fixture
def redis_env(make_settings, milvus_uri: str, tiny_encoder):
    settings = make_settings(milvus_uri=milvus_uri, max_retries=2, pixel_store_url=REDIS_URL, pixel_ttl_seconds=300)
    upgrade(settings.effective_database_url)
    rt = Runtime(settings)
    rt.__dict__["encoder"] = tiny_encoder
    return settings, rt, RecordingDispatcher(settings)


def test_evicted_entry_is_recomputed_to_the_same_vector(redis_env, tmp_path: Path) -> None:
    """Two images: one encoded from its Redis entry, one whose entry was evicted before encode
    (recomputed from the source). Both are indexed, the entries are gone afterwards, and the
    recomputed vector equals the one from stored pixels (the handoff is lossless)."""
    settings, rt, d = redis_env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    src = write_image(tmp_path / sku / "a.jpg", 11)
    twin = tmp_path / sku / "b.jpg"
    twin.write_bytes(src.read_bytes())  # same pixels, another image
    events = [ImageEvent(uri=str(p), sku=sku) for p in (src, twin)]
    for e in events:
        assert pipeline.preprocess(rt, d, PreprocessPayload(event=e)) == "queued"
    payloads = [EncodePayload.model_validate(b) for b, _ in d.take(TASK_ENCODE)]
    client = redis.Redis.from_url(REDIS_URL)
    keys = [RedisPixelStore.prefix + p.pixel_key for p in payloads]
    assert all(0 < client.ttl(k) <= 300 for k in keys)
    client.delete(keys[1])  # evicted
    result = encode_stage.encode_batch(rt, d, payloads)
    assert result.indexed == 2 and result.failed == 0
    assert client.exists(*keys) == 0  # consumed entries are removed, not left to expire
    vecs = rt.store.image_vectors(rt.names().images, [e.image_id for e in events])
    a, b = (np.asarray(vecs[e.image_id]) for e in events)
    assert float(a @ b) > 0.99999
    client.close()


def test_pixel_store_down_on_preprocess_is_retried_not_failed(make_settings, milvus_uri: str, tiny_encoder, tmp_path):
    settings = make_settings(milvus_uri=milvus_uri, pixel_store_url=f"redis://127.0.0.1:{free_port()}/0")
    upgrade(settings.effective_database_url)
    rt = Runtime(settings)
    rt.__dict__["encoder"] = tiny_encoder
    d = RecordingDispatcher(settings)
    e = ImageEvent(uri=str(write_image(tmp_path / "S" / "a.jpg", 3)), sku="S-down")
    payload = PreprocessPayload(event=e)
    with pytest.raises(TransientError) as err:
        pipeline.preprocess(rt, d, payload)
    assert pipeline.record_failure(rt, d, payload, err.value) == "retried"
    assert rt.ledger.get(e.image_id).state == "pending"  # type: ignore[union-attr]
