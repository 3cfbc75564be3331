"""The CUDA paths of the encoder, the device probe and the GPU metrics, on a real GPU.

Skipped where torch sees no CUDA device (this project's CI machine has none); run on a lent GPU
machine with ``python -m pytest tests/unit/encoders/test_cuda.py``. Random weights (no model hub).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from config.settings import EncoderConfig
from worker.encoders import create_encoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pixels(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_vectors_match_cpu_fp32(precision: str) -> None:
    """ViT-B-32 on CUDA (pinned host memory, asynchronous copy, channels-last, autocast) gives the
    vectors of the plain fp32 CPU path: the same weights (seeded) and the same normalisation."""
    cpu = create_encoder(EncoderConfig(spec="open_clip:ViT-B-32", device="cpu", precision="fp32")).load()
    gpu = create_encoder(EncoderConfig(spec="open_clip:ViT-B-32", device="cuda", precision=precision)).load()
    assert gpu.device.type == "cuda"
    assert gpu.model_id == cpu.model_id  # the device and precision are not part of the vector's identity
    px = _pixels(6, cpu.preprocess_cfg.size)
    a, b = cpu.encode(px), gpu.encode(px)
    assert b.dtype == np.float32 and b.shape == a.shape
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(axis=1)
    floor = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.99}[precision]
    assert cos.min() >= floor, cos


def test_cuda_batch_independent_of_batch_size() -> None:
    """An image's vector does not depend on what else is in its micro-batch."""
    enc = create_encoder(EncoderConfig(spec="open_clip:ViT-B-32", device="cuda", precision="fp16")).load()
    px = _pixels(33, enc.preprocess_cfg.size, seed=1)
    alone = enc.encode(px[:1])
    together = enc.encode(px)
    assert float((alone[0] * together[0]).sum()) >= 0.999


def test_cuda_encode_async_returns_before_the_vectors_and_gives_encodes_vectors() -> None:
    """encode_async queues the forward pass and the copy to pinned memory, returns at once (the
    vectors still on the device), and two batches queued back to back give encode()'s vectors."""
    enc = create_encoder(EncoderConfig(spec="open_clip:ViT-B-32", device="cuda", precision="fp16")).load()
    a, b = _pixels(64, enc.preprocess_cfg.size, seed=2), _pixels(64, enc.preprocess_cfg.size, seed=3)
    first, second = enc.encode_async(a), enc.encode_async(b)
    assert first.on_device and second.on_device
    np.testing.assert_allclose(second.result(), enc.encode(b), atol=2e-3)
    np.testing.assert_allclose(first.result(), enc.encode(a), atol=2e-3)


def test_cuda_text_tower() -> None:
    enc = create_encoder(EncoderConfig(spec="tiny", device="cuda", precision="fp16")).load()
    v = enc.encode_text(["a red shoe", "a blue bag"])
    assert v.shape == (2, enc.dim) and np.isfinite(v).all()


def test_device_probe_and_gpu_metrics() -> None:
    from worker.health import probe_device
    from worker.metrics.collectors import gpu_memory_snapshot, nvml_snapshot

    enc = create_encoder(EncoderConfig(spec="tiny", device="cuda", precision="fp32")).load()
    enc.encode(_pixels(2, enc.preprocess_cfg.size))
    assert probe_device("cuda") is None  # no complaint from a healthy GPU
    snap = gpu_memory_snapshot()["cuda:0"]
    assert snap["allocated"] > 0 and snap["peak"] >= snap["allocated"] and snap["total"] > snap["peak"]
    util = nvml_snapshot()
    if util:  # NVML binding present
        assert 0.0 <= util["cuda:0"]["utilization"] <= 1.0


def test_cuda_peak_memory_of_evaluate() -> None:
    from worker.evaluate_run import _PeakMemory

    meter = _PeakMemory(torch.device("cuda"))
    meter.begin()
    enc = create_encoder(EncoderConfig(spec="open_clip:ViT-B-32", device="cuda", precision="fp16")).load()
    enc.encode(_pixels(8, enc.preprocess_cfg.size))
    peak, method = meter.end(weights_bytes=0)
    assert method == "cuda_max_allocated"
    assert peak is not None and peak > 100 * 2**20  # ViT-B-32's weights alone are ~350 MB in fp32


def test_nvjpeg_batch_decode_gives_the_cpu_paths_vectors() -> None:
    """IMGSYNC_JPEG_DECODE=encoder on CUDA: a batch of camera JPEGs (EXIF-rotated, cropped, one on a
    white backdrop, one with a garbage scan) decoded by nvJPEG and fitted on the GPU gives the CPU
    path's vectors (cos ≥ 0.999), and the broken file is answered by an exception in its slot."""
    import io

    from PIL import Image

    from config.settings import ImagingConfig
    from schemas.events import CropBox
    from tests.helpers import photo
    from worker.imaging.decode import decode_and_crop
    from worker.imaging.device_decode import decode_batch, plan_handoff

    limits = ImagingConfig(max_pixels=100_000_000, min_side=8)
    enc = create_encoder(EncoderConfig(spec="open_clip:ViT-B-32", device="cuda", precision="fp32")).load()
    cfg = enc.preprocess_cfg
    datas, crops = [], []
    for i, (w, h) in enumerate([(4000, 3000), (1200, 1600), (800, 800), (2048, 1536)]):
        base = np.asarray(photo(w // 8, h // 8, seed=i).resize((w, h)), np.int16)
        img = Image.fromarray(np.clip(base + np.random.default_rng(i).normal(0, 6, base.shape), 0, 255).astype(np.uint8))
        if i == 2:
            canvas = Image.new("RGB", (1600, 1200), (255, 255, 255))
            canvas.paste(img, (400, 200))
            img = canvas
        exif = Image.Exif()
        exif[0x0112] = 6 if i == 1 else 1
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
        datas.append(buf.getvalue())
        crops.append(CropBox(x=0.1, y=0.1, w=0.5, h=0.7) if i == 3 else None)
    sos = datas[0].find(b"\xff\xda")
    broken = datas[0][: sos + 20] + np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes() + b"\xff\xd9"
    handoffs = [plan_handoff(d, limits, cfg, max_bytes=2**26) for d in [*datas, broken]]
    assert all(h is not None for h in handoffs)
    out = decode_batch(list(zip(handoffs, [*crops, None])), cfg, enc.device, auto_trim=True, max_chunk_pixels=2**28)  # type: ignore[arg-type]
    assert isinstance(out[-1], Exception)
    assert all(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in out[:-1])
    gpu = enc.encode(out[:-1])  # type: ignore[arg-type]
    cpu = enc.encode(
        [enc.preprocess([decode_and_crop(d, limits, c, min_side=2 * max(cfg.size))])[0] for d, c in zip(datas, crops, strict=True)]
    )
    cos = (gpu * cpu).sum(axis=1)
    assert cos.min() >= 0.999, cos


def test_gpu_gauges_step_sets_the_memory_gauges_while_idle() -> None:
    """The encode worker's timer step sets the GPU memory gauges with no batch running."""
    from prometheus_client import REGISTRY

    from worker.metrics import metrics
    from worker.metrics.gpu_gauges import GpuGauges

    torch.zeros(1024, device="cuda")  # a CUDA context and some allocation to read
    metrics()
    GpuGauges.sample(object.__new__(GpuGauges))
    total = REGISTRY.get_sample_value("imgsync_gpu_memory_bytes", {"device": "cuda:0", "kind": "total"})
    assert total is not None and total > 0
