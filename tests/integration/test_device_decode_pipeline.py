"""IMGSYNC_JPEG_DECODE=encoder through the pipeline stages: preprocess hands JPEG bytes over, the
encode stage decodes its batch on the encoder's device and indexes vectors equal to the CPU path's.

Real ledger (SQLite), real Milvus Lite server, real pixel store, the tiny model. The device is the
CPU here (no GPU on this machine): ``torchvision.io.decode_jpeg`` runs libjpeg-turbo instead of
nvJPEG, through the same code.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schemas.events import CropBox, ImageEvent
from schemas.tasks import EncodePayload, PreprocessPayload
from tests.helpers import photo
from tests.integration.test_pipeline import RecordingDispatcher, run_until_idle
from worker import encode_stage, pipeline
from worker.dispatch import TASK_ENCODE
from worker.imaging.device_decode import JpegHandoff
from worker.ledger import upgrade
from worker.metrics import metrics
from worker.runtime import Runtime


@pytest.fixture
def handoff_env(make_settings, milvus_uri: str, tiny_encoder):
    settings = make_settings(milvus_uri=milvus_uri, max_retries=2, jpeg_decode="encoder")
    upgrade(settings.effective_database_url)
    rt = Runtime(settings)
    rt.__dict__["encoder"] = tiny_encoder
    return settings, rt, RecordingDispatcher(settings)


def _camera_jpeg(path: Path, size: tuple[int, int], seed: int, **params: object) -> Path:
    base = np.asarray(photo(size[0] // 8, size[1] // 8, seed=seed).resize(size), np.int16)
    noisy = np.clip(base + np.random.default_rng(seed).normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy).save(path, "JPEG", quality=90, **params)
    return path


def _count(outcome: str) -> float:
    return metrics().images.labels("device_decode", outcome)._value.get()


def _vectors(rt: Runtime, events: list[ImageEvent]) -> dict[str, np.ndarray]:
    return rt.store.image_vectors(rt.names().images, [e.image_id for e in events])


def _three_handed_over(
    rt: Runtime, d: RecordingDispatcher, tmp_path: Path, seed: int
) -> tuple[list[ImageEvent], list[EncodePayload]]:
    """Three camera JPEGs of one new SKU through preprocess: their events and encode payloads."""
    sku = f"S-{uuid.uuid4().hex[:6]}"
    events = [ImageEvent(uri=str(_camera_jpeg(tmp_path / sku / f"{i}.jpg", (640, 480), seed + i)), sku=sku) for i in range(3)]
    for e in events:
        pipeline.preprocess(rt, d, PreprocessPayload(event=e))
    return events, [EncodePayload.model_validate(b) for b, _ in d.take(TASK_ENCODE)]


def test_jpegs_are_handed_over_and_indexed_like_the_cpu_path(handoff_env, tmp_path: Path) -> None:
    """JPEGs (one rotated by EXIF, one with a crop box) travel as bytes, a PNG as pixels; the batch
    is indexed, and each vector equals the CPU path's (cos ≥ 0.999)."""
    settings, rt, d = handoff_env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [
        _camera_jpeg(tmp_path / sku / "a.jpg", (1200, 900), 1),
        _camera_jpeg(tmp_path / sku / "b.jpg", (900, 1200), 2, exif=exif.tobytes()),
        _camera_jpeg(tmp_path / sku / "c.jpg", (1000, 800), 3),
    ]
    png = tmp_path / sku / "d.png"
    photo(300, 200, seed=4).save(png)
    crops = [None, None, CropBox(x=0.1, y=0.2, w=0.6, h=0.5), None]
    events = [ImageEvent(uri=str(f), sku=sku, crop=c) for f, c in zip([*files, png], crops, strict=True)]
    for e in events:
        assert pipeline.preprocess(rt, d, PreprocessPayload(event=e)) == "queued"
    sent = [EncodePayload.model_validate(b) for b, _ in d.take(TASK_ENCODE)]
    entries = [rt.pixels.get(p.pixel_key) for p in sent]
    assert [type(e).__name__ for e in entries] == ["JpegHandoff", "JpegHandoff", "JpegHandoff", "ndarray"]
    assert entries[1].orientation == 6  # type: ignore[union-attr]
    decoded_before = _count("decoded")

    result = encode_stage.encode_batch(rt, d, sent)
    run_until_idle(rt, d)

    assert (result.indexed, result.failed) == (4, 0)
    assert _count("decoded") - decoded_before == 3
    assert all(rt.pixels.get(p.pixel_key) is None for p in sent)  # entries dropped once indexed
    got = _vectors(rt, events)
    for e in events:
        want = rt.encoder.encode([pipeline.model_pixels(rt, Path(e.uri.removeprefix("file://")).read_bytes(), e.crop)])[0]
        assert float(got[e.image_id] @ want) >= 0.999, e.uri
        assert rt.ledger.get(e.image_id).state == "indexed"  # type: ignore[union-attr]


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu(handoff_env, tmp_path: Path, monkeypatch) -> None:
    """A picture the device decoder fails on (fault injected: nvJPEG refusing what libjpeg-turbo
    reads) is decoded from the same bytes on the CPU and indexed; its batch mates are decoded on the
    device; the fallback is counted."""
    from worker.imaging import device_decode

    settings, rt, d = handoff_env
    events, sent = _three_handed_over(rt, d, tmp_path, seed=10)
    real = device_decode._decode_chunk

    def refuse_the_second(handoffs, device):
        out = real(handoffs, device)
        return [RuntimeError("nvjpeg: unsupported sampling") if i == 1 else o for i, o in enumerate(out)]

    monkeypatch.setattr(device_decode, "_decode_chunk", refuse_the_second)
    before = (_count("decoded"), _count("fallback"))

    result = encode_stage.encode_batch(rt, d, sent)

    assert (result.indexed, result.failed) == (3, 0)
    assert (_count("decoded") - before[0], _count("fallback") - before[1]) == (2, 1)
    got = _vectors(rt, events)
    want = rt.encoder.encode([pipeline.model_pixels(rt, Path(events[1].uri.removeprefix("file://")).read_bytes(), None)])[0]
    assert float(got[events[1].image_id] @ want) >= 0.9999


def test_a_broken_jpeg_is_recorded_with_its_reason_and_spares_its_batch(handoff_env, tmp_path: Path) -> None:
    """A JPEG with a sound header but a garbage scan is handed over, fails on the device and on the
    CPU, and is recorded failed (corrupt) with no vector; the other images of its batch are indexed."""
    settings, rt, d = handoff_env
    sku = f"S-{uuid.uuid4().hex[:6]}"
    good = [_camera_jpeg(tmp_path / sku / f"{i}.jpg", (640, 480), 20 + i) for i in range(2)]
    data = good[0].read_bytes()
    sos = data.find(b"\xff\xda")
    bad = tmp_path / sku / "broken.jpg"
    bad.write_bytes(data[: sos + 20] + np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes() + b"\xff\xd9")
    events = [ImageEvent(uri=str(p), sku=sku) for p in (good[0], bad, good[1])]
    for e in events:
        assert pipeline.preprocess(rt, d, PreprocessPayload(event=e)) == "queued"  # the header looked fine
    sent = [EncodePayload.model_validate(b) for b, _ in d.take(TASK_ENCODE)]
    assert isinstance(rt.pixels.get(sent[1].pixel_key), JpegHandoff)
    failures_before = metrics().failures.labels("corrupt")._value.get()

    result = encode_stage.encode_batch(rt, d, sent)

    assert (result.indexed, result.failed) == (2, 1)
    row = rt.ledger.get(events[1].image_id)
    assert row is not None and (row.state, row.reason) == ("failed", "corrupt")
    assert metrics().failures.labels("corrupt")._value.get() - failures_before == 1
    assert set(_vectors(rt, events)) == {events[0].image_id, events[2].image_id}
    assert rt.pixels.get(sent[1].pixel_key) is None


def test_files_the_cpu_must_judge_are_decoded_by_preprocess(handoff_env, tmp_path: Path) -> None:
    """A truncated JPEG is not handed over: preprocess decodes it and records ``truncated`` at once."""
    settings, rt, d = handoff_env
    buf = io.BytesIO()
    photo(320, 240, seed=30).save(buf, "JPEG", quality=90)
    path = tmp_path / "t" / "cut.jpg"
    path.parent.mkdir(parents=True)
    path.write_bytes(buf.getvalue()[:-300])
    event = ImageEvent(uri=str(path), sku=f"S-{uuid.uuid4().hex[:6]}")
    from worker.errors import PermanentError

    with pytest.raises(PermanentError) as err:
        pipeline.preprocess(rt, d, PreprocessPayload(event=event))
    assert err.value.reason == "truncated"
    assert d.take(TASK_ENCODE) == []


def test_a_lost_handoff_entry_is_prepared_again(handoff_env, tmp_path: Path) -> None:
    """An encode whose JPEG entry expired re-runs preprocessing (on the CPU) instead of failing."""
    settings, rt, d = handoff_env
    e = ImageEvent(uri=str(_camera_jpeg(tmp_path / "x" / "a.jpg", (640, 480), 40)), sku=f"S-{uuid.uuid4().hex[:6]}")
    pipeline.preprocess(rt, d, PreprocessPayload(event=e))
    (body, _), = d.take(TASK_ENCODE)
    payload = EncodePayload.model_validate(body)
    rt.pixels.delete(payload.pixel_key)
    assert encode_stage.encode_batch(rt, d, [payload]).indexed == 1


def test_a_device_refusing_every_picture_is_a_device_fault(handoff_env, tmp_path: Path, monkeypatch) -> None:
    """When the device refuses every JPEG of a batch and fails its health probe (faults injected: no
    GPU here), the batch is retried as a device error and the worker pauses; nothing is decoded on
    the CPU in the meantime and no image is failed."""
    from worker import health
    from worker.imaging import device_decode

    settings, rt, d = handoff_env
    events, sent = _three_handed_over(rt, d, tmp_path, seed=50)
    monkeypatch.setattr(device_decode, "_decode_chunk", lambda handoffs, device: [RuntimeError("CUDA error: an illegal memory access")] * len(handoffs))
    monkeypatch.setattr(encode_stage, "probe_device", lambda device: f"device {device}: CUDA error: an illegal memory access")
    monkeypatch.setattr(health, "_gate", health.Gate())  # this test's own gate
    fallbacks_before = _count("fallback")
    result = encode_stage.encode_batch(rt, d, sent)
    assert (result.indexed, result.retried, result.failed) == (0, 3, 0)
    assert not health.gate().is_open()
    assert _count("fallback") == fallbacks_before
    retried = [EncodePayload.model_validate(b) for b, _ in d.take(TASK_ENCODE)]
    assert sorted(p.pixel_key for p in retried) == sorted(p.pixel_key for p in sent)  # the JPEGs are kept
    assert all(isinstance(rt.pixels.get(p.pixel_key), JpegHandoff) for p in retried)
    assert all(rt.ledger.get(e.image_id).state == "pending" for e in events)  # type: ignore[union-attr]
