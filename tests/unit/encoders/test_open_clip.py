"""open_clip backend and tiny model: vectors identical to open_clip's own code path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config.settings import ImagingConfig
from schemas.reasons import Reason
from tests.helpers import photo, reference_open_clip
from worker.encoders import create_encoder
from worker.errors import ConfigError, TransientError
from worker.imaging.decode import decode_image

LIMITS = ImagingConfig(max_pixels=10**8, min_side=1)


def varied_files(tmp_path: Path) -> list[Path]:
    """Different sizes, aspect ratios, modes and formats."""
    specs = [
        ((320, 240), "RGB", "JPEG"),
        ((100, 400), "RGB", "PNG"),
        ((64, 64), "L", "PNG"),
        ((33, 517), "RGB", "WEBP"),
        ((800, 600), "P", "PNG"),
        ((257, 129), "RGB", "TIFF"),
    ]
    files = []
    for i, ((w, h), mode, fmt) in enumerate(specs):
        p = tmp_path / f"img{i}.{fmt.lower()}"
        img = photo(w, h, seed=i)
        img = img.convert(mode) if mode != "P" else img.quantize(64)
        img.save(p, format=fmt)
        files.append(p)
    return files


def imgsync_vectors(encoder, files: list[Path]) -> np.ndarray:
    images = [decode_image(f.read_bytes(), LIMITS) for f in files]
    return encoder.encode(encoder.preprocess(images))


def test_tiny_matches_open_clip_reference(tmp_path: Path, tiny_encoder) -> None:
    """Each varied image: cos >= 0.9999 between imgsync's batched path and open_clip's own path."""
    files = varied_files(tmp_path)
    ours = imgsync_vectors(tiny_encoder, files)
    ref = reference_open_clip("imgsync-tiny")([Image.open(f).convert("RGB") for f in files])
    cos = (ours * ref).sum(axis=1)
    assert ours.dtype == np.float32 and ours.shape == (len(files), tiny_encoder.dim)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert cos.min() >= 0.9999, cos


def test_local_checkpoint_loads_and_matches(tmp_path: Path) -> None:
    """Weights from a local checkpoint file are used (not the seed) and match open_clip loading that file."""
    import open_clip

    from worker.encoders.tiny import register_tiny_config

    register_tiny_config()
    torch.manual_seed(123)
    model = open_clip.create_model("imgsync-tiny", pretrained=None)
    ckpt = tmp_path / "tiny-ckpt.pt"
    torch.save(model.state_dict(), ckpt)

    enc = create_encoder(f"open_clip:imgsync-tiny@{ckpt}")
    files = varied_files(tmp_path)
    ours = imgsync_vectors(enc, files)
    ref = reference_open_clip("imgsync-tiny", pretrained=str(ckpt), seed=999)(
        [Image.open(f).convert("RGB") for f in files]
    )
    assert (ours * ref).sum(axis=1).min() >= 0.9999
    seeded = create_encoder("tiny")
    assert (ours * imgsync_vectors(seeded, files)).sum(axis=1).max() < 0.999  # really other weights
    assert "@file-" in enc.model_id and enc.model_id != seeded.model_id


def _local_dir(folder: Path, seed: int) -> Path:
    """An open_clip ``local-dir:`` folder (its config and weights) of the tiny architecture."""
    import json

    import open_clip

    from worker.encoders.tiny import register_tiny_config

    register_tiny_config()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("imgsync-tiny")}))
    torch.manual_seed(seed)
    torch.save(open_clip.create_model("imgsync-tiny", pretrained=None).state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def test_local_dir_weights_are_part_of_the_model_id(tmp_path: Path, caplog) -> None:
    """`open_clip:local-dir:/folder`: the folder's weights are loaded (no random-weights warning) and
    their content is the model's identity, so new weights in the same folder are another model."""
    folder = _local_dir(tmp_path / "model", seed=1)
    first = create_encoder(f"open_clip:local-dir:{folder}")
    with caplog.at_level("WARNING"):
        first_id = first.model_id
    assert "@dir-" in first_id and "RANDOM WEIGHTS" not in caplog.text
    files = varied_files(tmp_path)
    ref = reference_open_clip(f"local-dir:{folder}", seed=999)([Image.open(f).convert("RGB") for f in files])
    assert (imgsync_vectors(first, files) * ref).sum(axis=1).min() >= 0.9999
    _local_dir(folder, seed=2)  # the same folder, other weights
    assert create_encoder(f"open_clip:local-dir:{folder}").model_id != first_id
    with pytest.raises(ConfigError, match="does not exist"):
        create_encoder(f"open_clip:local-dir:{tmp_path / 'nope'}").load()


def test_the_tokenizer_is_read_on_first_text_only(tiny_encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image-only use never loads the tokenizer (for some architectures it lives on the hub); one that
    cannot be loaded is a ConfigError naming the setting, not a raw OSError. (The hub is faked: there
    is none here.)"""
    import open_clip

    enc = create_encoder("tiny").load()
    assert enc._tokenizer is None
    enc.encode(enc.preprocess([photo(80, 60, seed=3)]))
    assert enc._tokenizer is None

    def offline(name):  # type: ignore[no-untyped-def]
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    with pytest.raises(ConfigError, match="IMGSYNC_MODEL=.*no tokenizer"):
        enc.encode_text(["a red shoe"])
    monkeypatch.undo()
    assert enc.encode_text(["a red shoe"]).shape == (1, enc.dim)


def test_model_id_changes_with_preprocessing(tiny_encoder) -> None:
    """model_id covers backend, name, weights and the preprocessing hash."""
    from dataclasses import replace

    mid = tiny_encoder.model_id
    assert mid.startswith("tiny:imgsync-tiny@random-seed0#")
    assert mid.endswith(tiny_encoder.preprocess_cfg.hash)
    other = replace(tiny_encoder.preprocess_cfg, interpolation="bilinear")
    assert other.hash != tiny_encoder.preprocess_cfg.hash


def test_text_tower(tiny_encoder) -> None:
    """CLIP-like models embed text into the image space (normalized, same dim)."""
    v = tiny_encoder.encode_text(["a red shoe", "a blue bag"])
    assert v.shape == (2, tiny_encoder.dim)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_a_batch_mixing_host_pixels_and_device_tensors_keeps_its_order(tiny_encoder) -> None:
    """Pictures decoded on the device (3×H×W tensors) and host pixels (H×W×3 arrays) in one batch
    give each the vector it gets alone, in the batch's order."""
    import torch

    h, w = tiny_encoder.preprocess_cfg.size
    px = [np.random.default_rng(s).integers(0, 256, (h, w, 3), dtype=np.uint8) for s in range(5)]
    alone = tiny_encoder.encode(px)
    mixed = [torch.from_numpy(p).permute(2, 0, 1) if i in (0, 2, 3) else p for i, p in enumerate(px)]
    np.testing.assert_allclose(tiny_encoder.encode(mixed), alone, atol=1e-5)
    np.testing.assert_allclose(tiny_encoder.encode([torch.from_numpy(p).permute(2, 0, 1) for p in px]), alone, atol=1e-5)


def test_cuda_oom_splits_batch(tiny_encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA OOM (injected: no GPU here) splits the batch in halves; results equal the unsplit batch."""
    pixels = tiny_encoder.preprocess([photo(80, 60, seed=i) for i in range(7)])
    expected = tiny_encoder.encode(pixels)
    real = type(tiny_encoder)._encode_now
    sizes: list[int] = []

    def flaky(self, batch):  # type: ignore[no-untyped-def]
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, batch)

    monkeypatch.setattr(type(tiny_encoder), "_encode_now", flaky)
    got = tiny_encoder.encode(pixels)
    # on a GPU, cuBLAS/cuDNN choose kernels by batch size: the halves differ in the last digits
    np.testing.assert_allclose(got, expected, atol=1e-6 if tiny_encoder.device.type == "cpu" else 5e-5)
    assert sizes[0] == 7 and max(s for s in sizes[1:]) <= 4


def test_cuda_oom_on_single_image_is_transient(tiny_encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image that does not fit even alone fails as a transient device_error (retried later)."""

    def always(self, batch):  # type: ignore[no-untyped-def]
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(type(tiny_encoder), "_encode_now", always)
    with pytest.raises(TransientError) as err:
        tiny_encoder.encode(tiny_encoder.preprocess([photo(50, 50, seed=1)] * 2))
    assert err.value.reason is Reason.device_error


def test_encode_async_on_cpu_computes_before_it_returns(tiny_encoder) -> None:
    """Off CUDA there is no device queue: encode_async has the vectors when it returns (nothing to
    overlap, so write-behind stays off in ``auto``), and they are encode()'s."""
    pixels = tiny_encoder.preprocess([photo(80, 60, seed=i) for i in range(5)])
    pending = tiny_encoder.encode_async(pixels)
    assert not pending.on_device
    np.testing.assert_array_equal(pending.result(), tiny_encoder.encode(pixels))


def test_cuda_oom_at_launch_falls_back_to_the_halving_encode(tiny_encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA OOM when encode_async launches a batch (injected: the encoder is told it is on CUDA,
    its forward pass refuses more than 2 images) falls back to encode()'s halving: every image gets
    its vector, computed before it returns."""
    pixels = tiny_encoder.preprocess([photo(80, 60, seed=i) for i in range(7)])
    expected = tiny_encoder.encode(pixels)
    enc = type(tiny_encoder)(tiny_encoder.spec, device="cpu", precision="fp32").load()
    real = type(enc)._forward_batch
    sizes: list[int] = []
    ran: list[int] = []

    def flaky(self, batch):  # type: ignore[no-untyped-def]
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        ran.append(len(batch))
        self.device = torch.device("cpu")  # the real forward pass runs on this machine's CPU
        try:
            return real(self, batch)
        finally:
            self.device = torch.device("cuda")

    monkeypatch.setattr(type(enc), "_forward_batch", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    enc.device = torch.device("cuda")
    pending = enc.encode_async(pixels)
    assert not pending.on_device and sizes[:2] == [7, 7] and sum(ran) == 7 and max(ran) <= 2
    np.testing.assert_allclose(pending.result(), expected, atol=1e-6)


def test_vit_b_32_random_weights_on_cpu() -> None:
    """A real architecture (ViT-B-32, random weights) loads and encodes on CPU, 512-d."""
    enc = create_encoder("open_clip:ViT-B-32").load()
    assert enc.dim == 512 and enc.preprocess_cfg.size == (224, 224)
    v = enc.encode(enc.preprocess([photo(300, 200, seed=3), photo(120, 160, seed=4)]))
    assert v.shape == (2, 512) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_bad_device_setting() -> None:
    """IMGSYNC_DEVICE must be auto/cpu/cuda[:N]; cuda without a GPU is a clear error."""
    from config.settings import EncoderConfig

    with pytest.raises(ConfigError, match="IMGSYNC_DEVICE"):
        create_encoder(EncoderConfig(spec="tiny", device="tpu", precision="fp32")).load()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            create_encoder(EncoderConfig(spec="tiny", device="cuda", precision="fp32")).load()



def test_reduced_precision_request_runs_fp32_on_cpu(tiny_encoder) -> None:
    """IMGSYNC_PRECISION=bf16 on a CPU device encodes in fp32: the same vectors as fp32."""
    from config.settings import EncoderConfig

    enc = create_encoder(EncoderConfig(spec="tiny", device="cpu", precision="bf16")).load()
    pixels = tiny_encoder.preprocess([photo(90, 70, seed=8)])
    np.testing.assert_allclose(enc.encode(pixels), tiny_encoder.encode(pixels), atol=1e-6)
