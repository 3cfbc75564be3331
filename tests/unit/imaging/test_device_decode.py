"""JPEG decoding on the encoder's device: which files are handed over, and that the device path
(orientation, crop, trim, model geometry) renders them as the CPU path does.

These run the device path on the CPU (``torchvision.io.decode_jpeg`` with libjpeg-turbo): no GPU
here. The same code on CUDA (nvJPEG) is checked by tests/unit/encoders/test_cuda.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from config.settings import ImagingConfig
from schemas.events import CropBox
from tests.helpers import photo
from tests.unit.imaging.test_decode import _ADOBE_COLORANTS, _ADOBE_GAMMA, _rgb_profile
from tests.unit.imaging.test_trim import _on_backdrop, _product
from worker.encoders.base import PreprocessCfg
from worker.imaging.decode import apply_crop, decode_and_crop
from worker.imaging.device_decode import (
    JpegHandoff,
    crop_tensor,
    decode_batch,
    fit_tensor,
    orient_tensor,
    plan_handoff,
    trim_tensor,
)
from worker.imaging.geometry import apply_geometry
from worker.imaging.trim import trim_border

LIMITS = ImagingConfig(max_pixels=100_000_000, min_side=8)
CFG = PreprocessCfg(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CPU = torch.device("cpu")
MAX_BYTES = 16 * 2**20


def _jpeg(img: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **{"quality": 92, **params})
    return buf.getvalue()


def _camera(width: int, height: int, seed: int) -> Image.Image:
    """A photo with sensor noise, as a camera JPEG has (structure alone compresses unrealistically)."""
    base = np.asarray(photo(max(8, width // 8), max(8, height // 8), seed=seed).resize((width, height)), np.int16)
    noise = np.random.default_rng(seed).normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).cpu().numpy()


def _chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def _cpu_path(data: bytes, crop: CropBox | None = None, cfg: PreprocessCfg = CFG, limits: ImagingConfig = LIMITS) -> np.ndarray:
    """What the preprocess workers make of ``data`` (reduced-scale decode, crop or trim, geometry)."""
    return apply_geometry(decode_and_crop(data, limits, crop, min_side=2 * max(cfg.size)), cfg)


def _device_path(data: bytes, crop: CropBox | None = None, cfg: PreprocessCfg = CFG, limits: ImagingConfig = LIMITS) -> np.ndarray:
    handoff = plan_handoff(data, limits, cfg, max_bytes=MAX_BYTES)
    assert handoff is not None
    (out,) = decode_batch([(handoff, crop)], cfg, CPU, auto_trim=limits.auto_trim, max_chunk_pixels=10**9)
    assert isinstance(out, torch.Tensor), out
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, *cfg.size)
    return _hwc(out)


def _assert_close(a: np.ndarray, b: np.ndarray, *, max_diff: int = 6, mean_diff: float = 0.8) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())


# --- what is handed over ----------------------------------------------------------------------------


def test_plain_jpeg_is_handed_over_with_its_header_facts() -> None:
    """A baseline YCbCr JPEG is handed over as its bytes, size and orientation, nothing decoded."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(photo(120, 80, seed=1), exif=exif.tobytes())
    handoff = plan_handoff(data, LIMITS, CFG, max_bytes=MAX_BYTES)
    assert handoff == JpegHandoff(data=data, orientation=6, width=120, height=80)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _jpeg(photo(90, 60, seed=2).convert("L")), id="grayscale"),
        pytest.param(lambda: _jpeg(photo(90, 60, seed=3), progressive=True), id="progressive"),
        pytest.param(
            lambda: _jpeg(photo(90, 60, seed=4), icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()),
            id="srgb-profile",
        ),
        pytest.param(lambda: _jpeg(photo(90, 60, seed=5), subsampling=0), id="4:4:4"),
    ],
)
def test_handed_over(make) -> None:
    """Grayscale, progressive, sRGB-tagged and unsubsampled JPEGs are handed over."""
    assert plan_handoff(make(), LIMITS, CFG, max_bytes=MAX_BYTES) is not None


def _with_adobe_marker(data: bytes, transform: int) -> bytes:
    """``data`` with Photoshop's APP14 "Adobe" segment after SOI (colour transform 1: YCbCr, 0: none)."""
    segment = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])
    return data[:2] + segment + data[2:]


def test_photoshop_ycbcr_jpeg_is_handed_over_and_rendered_alike() -> None:
    """A JPEG with Photoshop's Adobe marker and the usual YCbCr transform is handed over and gives
    the CPU path's model input."""
    data = _with_adobe_marker(_jpeg(_camera(800, 600, seed=31)), transform=1)
    assert Image.open(io.BytesIO(data)).info.get("adobe_transform") == 1
    _assert_close(_device_path(data), _cpu_path(data))


def _cmyk_with_adobe() -> bytes:
    return _jpeg(photo(64, 48, seed=6).convert("CMYK"))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _jpeg(photo(64, 48, seed=7))[:-400], id="truncated"),
        pytest.param(_cmyk_with_adobe, id="cmyk"),
        pytest.param(lambda: _with_adobe_marker(_jpeg(photo(64, 48, seed=12)), transform=0), id="rgb-without-ycbcr"),
        pytest.param(
            lambda: _jpeg(photo(64, 48, seed=8), icc_profile=_rgb_profile("Adobe RGB (1998)", _ADOBE_COLORANTS, _ADOBE_GAMMA)),
            id="adobe-rgb-profile",
        ),
        pytest.param(lambda: _jpeg(photo(64, 48, seed=9)) + b"TRAILER-AFTER-EOI", id="trailer"),
        pytest.param(lambda: _png(photo(64, 48, seed=10)), id="png"),
        pytest.param(lambda: b"", id="empty"),
        pytest.param(lambda: b"\xff\xd8\xff\xe0 not a jpeg \xff\xd9", id="garbage-header"),
        pytest.param(lambda: _jpeg(photo(200, 6, seed=11)), id="too-small"),
    ],
)
def test_left_to_the_cpu_path(make) -> None:
    """Files the device path would render differently, or that the CPU path must name a reason for,
    are not handed over (truncated, CMYK, RGB without the YCbCr transform, other colour profiles,
    trailers, other formats, too small)."""
    assert plan_handoff(make(), LIMITS, CFG, max_bytes=MAX_BYTES) is None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_limits_decide_too() -> None:
    """Over IMGSYNC_MAX_IMAGE_PIXELS or over the handoff's byte limit: decoded by preprocess."""
    data = _jpeg(photo(100, 100, seed=12))
    assert plan_handoff(data, LIMITS, CFG, max_bytes=len(data)) is not None
    assert plan_handoff(data, LIMITS, CFG, max_bytes=len(data) - 1) is None
    assert plan_handoff(data, ImagingConfig(max_pixels=9_999, min_side=8), CFG, max_bytes=MAX_BYTES) is None


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(PreprocessCfg(size=(224, 224), mean=(0,) * 3, std=(1,) * 3, geometry="hf:CLIPImageProcessor"), id="hf"),
        pytest.param(PreprocessCfg(size=(224, 224), mean=(0,) * 3, std=(1,) * 3, interpolation="lanczos"), id="lanczos"),
        pytest.param(PreprocessCfg(size=(224, 224), mean=(0,) * 3, std=(1,) * 3, interpolation="nearest"), id="nearest"),
    ],
)
def test_models_whose_geometry_the_device_cannot_reproduce_get_pixels(cfg: PreprocessCfg) -> None:
    """A model preprocessed by its HF image processor, or resized with a filter torch lacks, is fed
    by the CPU path."""
    assert plan_handoff(_jpeg(photo(100, 100, seed=13)), LIMITS, cfg, max_bytes=MAX_BYTES) is None


# --- the pieces, against the CPU path's own functions -------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_exif_transpose(orientation: int) -> None:
    """Each EXIF orientation turns the stored pixels exactly as Pillow's exif_transpose does."""
    stored = photo(60, 34, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = Image.open(io.BytesIO(_png_with_exif(stored, exif)))
    expected = np.asarray(ImageOps.exif_transpose(tagged).convert("RGB"))
    assert np.array_equal(_hwc(orient_tensor(_chw(stored), orientation)), expected)


def _png_with_exif(img: Image.Image, exif: Image.Exif) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize(
    "box", [CropBox(x=0.1, y=0.2, w=0.5, h=0.3), CropBox(x=0.0, y=0.0, w=1.0, h=1.0), CropBox(x=0.95, y=0.9, w=0.05, h=0.1)]
)
def test_crop_matches_apply_crop(box: CropBox) -> None:
    """The catalog's crop box cuts the same pixels."""
    img = photo(123, 77, seed=14)
    assert np.array_equal(_hwc(crop_tensor(_chw(img), box)), np.asarray(apply_crop(img, box)))


@pytest.mark.parametrize(
    "img",
    [
        pytest.param(_on_backdrop(Image.new("RGB", (640, 480), (255, 255, 255)), _product(200, 120, 1), (150, 210)), id="white"),
        pytest.param(_on_backdrop(Image.new("RGB", (500, 400), (30, 90, 160)), _product(90, 150, 2), (300, 60)), id="blue"),
        pytest.param(photo(300, 200, seed=15), id="no-backdrop"),
        pytest.param(Image.new("RGB", (50, 40), (255, 255, 255)), id="flat"),
        pytest.param(Image.new("RGB", (1, 40), (255, 255, 255)), id="one-column"),
    ],
)
def test_trim_matches_trim_border(img: Image.Image) -> None:
    """The uniform border is cut to the same box as trim_border (or the picture left whole)."""
    assert np.array_equal(_hwc(trim_tensor(_chw(img))), np.asarray(trim_border(img)))


def test_trim_takes_numpys_median_of_an_even_count() -> None:
    """Corner patches of an even pixel count take the mean of the middle two, as numpy's median
    (torch's own median takes the lower one, which would shift the backdrop colour)."""
    img = Image.new("RGB", (400, 300), (200, 200, 200))
    arr = np.asarray(img).copy()
    arr[::2, ::2] = (214, 214, 214)  # half of each corner patch: numpy's median is 207, torch's 200
    arr[100:200, 150:250] = (0, 0, 0)
    img = Image.fromarray(arr)
    assert np.array_equal(_hwc(trim_tensor(_chw(img))), np.asarray(trim_border(img)))


@pytest.mark.parametrize(
    ("size", "resize_mode", "resize_to", "interpolation", "fill"),
    [
        ((224, 224), "shortest", None, "bicubic", 0),
        ((224, 224), "shortest", None, "bilinear", 0),
        ((224, 224), "shortest", 256, "bicubic", 0),
        ((256, 192), "shortest", None, "bicubic", 0),
        ((224, 224), "longest", None, "bicubic", 127),
        ((224, 160), "squash", None, "bilinear", 0),
    ],
)
@pytest.mark.parametrize(("width", "height"), [(640, 480), (300, 900), (224, 224), (150, 100)])
def test_geometry_matches_apply_geometry(size, resize_mode, resize_to, interpolation, fill, width, height) -> None:
    """Every resize mode lands on the CPU geometry's pixels to within rounding."""
    cfg = PreprocessCfg(
        size=size, mean=(0,) * 3, std=(1,) * 3, interpolation=interpolation,
        resize_mode=resize_mode, resize_to=resize_to, fill_color=fill,
    )  # fmt: skip
    img = photo(width, height, seed=width + height)
    _assert_close(_hwc(fit_tensor(_chw(img), cfg)), apply_geometry(img, cfg), max_diff=2, mean_diff=0.2)


# --- whole pictures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "orientation", "crop"),
    [
        ((1600, 1200), 1, None),
        ((1200, 1600), 6, None),
        ((2000, 1500), 3, CropBox(x=0.2, y=0.1, w=0.5, h=0.6)),
        ((700, 500), 8, None),
    ],
)
def test_device_path_renders_like_the_cpu_path(size, orientation, crop) -> None:
    """Camera JPEGs (any orientation, with or without a crop box) give the CPU path's model input
    to within a few levels, although the CPU path decodes at a reduced DCT scale."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(_camera(*size, seed=size[0] + orientation), exif=exif.tobytes())
    _assert_close(_device_path(data, crop), _cpu_path(data, crop))


def test_product_on_white_is_trimmed_on_the_device_too() -> None:
    """A studio shot on white is trimmed like on the CPU: the model sees the product, not the backdrop."""
    img = _on_backdrop(Image.new("RGB", (1600, 1200), (255, 255, 255)), _product(500, 300, 3), (700, 500))
    data = _jpeg(img)
    device, cpu = _device_path(data), _cpu_path(data)
    # the CPU path finds the box at half scale: the product's sharp outline may land a model pixel
    # apart, so compare on average
    assert np.abs(device.astype(int) - cpu.astype(int)).mean() < 3
    untrimmed = apply_geometry(decode_and_crop(data, ImagingConfig(100_000_000, 8, auto_trim=False), None), CFG)
    assert np.abs(device.astype(int) - untrimmed.astype(int)).mean() > 20  # the trim did happen


def test_a_bad_file_fails_alone_in_its_chunk() -> None:
    """A JPEG whose scan is garbage (header fine, so it is handed over) is answered by an exception
    in its own slot; the chunk's other pictures are decoded."""
    good = [_jpeg(photo(160, 120, seed=s)) for s in (20, 21)]
    sos = good[0].find(b"\xff\xda")
    junk = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    bad = good[0][: sos + 20] + junk + b"\xff\xd9"
    handoffs = [plan_handoff(d, LIMITS, CFG, max_bytes=MAX_BYTES) for d in (good[0], bad, good[1])]
    assert all(h is not None for h in handoffs)
    out = decode_batch([(h, None) for h in handoffs], CFG, CPU, auto_trim=True, max_chunk_pixels=10**9)  # type: ignore[misc]
    assert isinstance(out[1], Exception)
    for i, data in ((0, good[0]), (2, good[1])):
        assert isinstance(out[i], torch.Tensor)
        _assert_close(_hwc(out[i]), _cpu_path(data))


def test_chunks_bound_the_pixels_decoded_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a pixel budget per decode call, a batch is decoded in several calls (a picture larger
    than the budget alone), and the results are the same as in one call."""
    from worker.imaging import device_decode

    calls: list[int] = []
    real = device_decode._decode_chunk

    def counting(handoffs, device):
        calls.append(sum(h.width * h.height for h in handoffs))
        return real(handoffs, device)

    monkeypatch.setattr(device_decode, "_decode_chunk", counting)
    datas = [_jpeg(photo(w, h, seed=w)) for w, h in ((100, 100), (100, 100), (300, 200), (100, 100))]
    items = [(plan_handoff(d, LIMITS, CFG, max_bytes=MAX_BYTES), None) for d in datas]
    chunked = decode_batch(items, CFG, CPU, auto_trim=True, max_chunk_pixels=25_000)  # type: ignore[arg-type]
    assert calls == [20_000, 60_000, 10_000]
    whole = decode_batch(items, CFG, CPU, auto_trim=True, max_chunk_pixels=10**9)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(chunked, whole, strict=True))  # type: ignore[arg-type]
