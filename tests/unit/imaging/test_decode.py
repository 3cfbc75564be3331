"""decode_image and apply_crop: bytes to 8-bit RGB, or a typed rejection with the right reason."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from config.settings import ImagingConfig
from schemas.events import CropBox
from schemas.reasons import Reason
from tests.helpers import photo
from worker.errors import PermanentError
from worker.imaging.decode import apply_crop, decode_image

LIMITS = ImagingConfig(max_pixels=100_000_000, min_side=8)

#: EXIF orientation → the transform that displays the stored pixels upright (EXIF 2.3, tag 0x0112).
_ORIENTATION_FIX: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _reason(data: bytes, limits: ImagingConfig = LIMITS) -> Reason:
    with pytest.raises(PermanentError) as info:
        decode_image(data, limits)
    return info.value.reason


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _header_only_png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


# --- orientation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    """A JPEG with EXIF orientation 1..8 decodes to the upright picture (size and pixels)."""
    original = photo(96, 56, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(original, "JPEG", quality=95, exif=exif.tobytes())

    out = decode_image(data, LIMITS)

    fix = _ORIENTATION_FIX[orientation]
    expected = original if fix is None else original.transpose(fix)
    assert out.mode == "RGB"
    assert out.size == expected.size
    assert _mean_abs_diff(out, expected) < 4.0
    # and it is the best match among all eight candidate orientations of the same size
    candidates = [original] + [original.transpose(t) for t in _ORIENTATION_FIX.values() if t is not None]
    diffs = [_mean_abs_diff(out, c) for c in candidates if c.size == out.size]
    assert min(diffs) == pytest.approx(_mean_abs_diff(out, expected))
    assert sorted(diffs)[1] > 15.0  # the picture is asymmetric enough for the check to mean something


# --- colour modes -----------------------------------------------------------------------------------


def test_rgba_is_composited_on_white() -> None:
    """Transparent pixels become white, opaque ones keep their colour, half-alpha blends with white."""
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[...] = (10, 20, 30, 255)
    arr[0, 0] = (10, 20, 30, 0)
    arr[0, 1] = (0, 0, 0, 128)
    data = _encode(Image.fromarray(arr, "RGBA"), "PNG")

    out = decode_image(data, LIMITS)

    px = np.asarray(out)
    assert out.mode == "RGB"
    assert tuple(px[0, 0]) == (255, 255, 255)
    assert tuple(px[5, 5]) == (10, 20, 30)
    assert all(abs(int(v) - 127) <= 1 for v in px[0, 1])


def test_palette_png_transparency_becomes_white() -> None:
    """A palette PNG's transparent index is white after decoding; other indexes keep their colour."""
    img = Image.new("P", (12, 12), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.putpixel((3, 4), 1)
    data = _encode(img, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"

    px = np.asarray(decode_image(data, LIMITS))

    assert px.shape == (12, 12, 3)
    assert tuple(px[0, 0]) == (255, 255, 255)  # index 0 was (10, 20, 30) but transparent
    assert tuple(px[4, 3]) == (200, 100, 50)


def test_16bit_grayscale_is_scaled_not_clipped() -> None:
    """16-bit values are scaled to 8 bits: 65535 → 255, 32768 → 128, 256 → 1 (not clipped to 255)."""
    arr = np.zeros((10, 10), np.uint16)
    arr[0, 0], arr[0, 1], arr[0, 2], arr[0, 3] = 65535, 32768, 256, 0
    src = Image.fromarray(arr)
    assert src.mode == "I;16"
    data = _encode(src, "PNG")

    out = decode_image(data, LIMITS)

    px = np.asarray(out)
    assert out.mode == "RGB"
    assert tuple(px[0, 0]) == (255, 255, 255)
    assert all(abs(int(v) - 128) <= 1 for v in px[0, 1])
    assert tuple(px[0, 2]) == (1, 1, 1)
    assert tuple(px[0, 3]) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb() -> None:
    """A CMYK JPEG decodes to RGB with the right colours (C+Y → green, M+Y → red)."""
    img = Image.new("CMYK", (24, 24), (0, 255, 255, 0))
    img.paste((255, 0, 255, 0), (0, 0, 12, 24))
    data = _encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"

    out = decode_image(data, LIMITS)

    px = np.asarray(out).astype(int)
    assert out.mode == "RGB"
    assert np.abs(px[12, 4] - (0, 255, 0)).max() <= 8
    assert np.abs(px[12, 20] - (255, 0, 0)).max() <= 8


def test_animated_gif_gives_first_frame() -> None:
    """An animated GIF decodes to its first frame."""
    frames = [Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (30, 20), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2

    out = decode_image(buf.getvalue(), LIMITS)

    assert out.mode == "RGB" and out.size == (30, 20)
    assert (np.asarray(out) == (255, 0, 0)).all()


def test_plain_rgb_png_round_trips_exactly() -> None:
    """A lossless RGB PNG decodes to exactly its pixels."""
    img = photo(40, 30, seed=9)
    out = decode_image(_encode(img, "PNG"), LIMITS)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(img))


# --- rejections -------------------------------------------------------------------------------------


def test_empty_bytes_are_corrupt() -> None:
    """Zero bytes are refused as corrupt."""
    assert _reason(b"") == Reason.corrupt


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not found</body></html>", id="html"),
        pytest.param(b"  <html><body>x</body></html>", id="html-lowercase-leading-space"),
        pytest.param(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nnewpath showpage\n", id="eps"),
        pytest.param(
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
            id="svg-xml",
        ),
        pytest.param(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>', id="svg"),
        pytest.param(b"just some text, not an image at all", id="text"),
    ],
)
def test_non_images_are_unsupported_format(data: bytes) -> None:
    """HTML, EPS, SVG and plain text are refused as unsupported_format, whatever the file is named."""
    assert _reason(data) == Reason.unsupported_format


def test_truncated_jpeg_is_truncated() -> None:
    """The first 60% of a real 400×300 JPEG is refused as truncated."""
    data = _encode(photo(400, 300, seed=5), "JPEG", quality=90)
    decode_image(data, LIMITS)  # the whole file is fine
    assert _reason(data[: int(len(data) * 0.6)]) == Reason.truncated


def test_png_with_corrupted_pixel_data_is_corrupt() -> None:
    """A PNG whose compressed pixel data is damaged is refused as corrupt."""
    data = bytearray(_encode(photo(64, 48, seed=6), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 4 + 5] ^= 0xFF
    assert _reason(bytes(data)) == Reason.corrupt


@pytest.mark.parametrize("chunk", [b"IHDR", b"IDAT"])
def test_png_with_corrupted_crc_is_refused(chunk: bytes) -> None:
    """A PNG whose chunk CRC does not match its data is refused as corrupt or truncated."""
    data = bytearray(_encode(photo(64, 48, seed=7), "PNG"))
    at = data.find(chunk)
    length = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 4 + length] ^= 0xFF  # first byte of the chunk's CRC
    assert _reason(bytes(data)) in (Reason.corrupt, Reason.truncated)


def test_pixel_limit_is_a_decompression_bomb() -> None:
    """A 100×100 image with max_pixels=5000 is refused as decompression_bomb."""
    data = _encode(photo(100, 100, seed=8), "PNG")
    assert _reason(data, ImagingConfig(max_pixels=5000, min_side=8)) == Reason.decompression_bomb
    assert decode_image(data, ImagingConfig(max_pixels=10_000, min_side=8)).size == (100, 100)


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [(100_000, 100_000, 100_000_000), (5000, 5000, 1_000_000)],
)
def test_header_only_bomb_is_refused_quickly(width: int, height: int, max_pixels: int) -> None:
    """A PNG header claiming a huge size is refused as decompression_bomb before any pixel is decoded."""
    data = _header_only_png(width, height)
    assert len(data) < 100
    start = time.perf_counter()
    assert _reason(data, ImagingConfig(max_pixels=max_pixels, min_side=8)) == Reason.decompression_bomb
    assert time.perf_counter() - start < 1.0


def test_tiny_image_is_too_small() -> None:
    """A 1×1 image with min_side=8 is refused as too_small."""
    data = _encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")
    assert _reason(data, ImagingConfig(max_pixels=1000, min_side=8)) == Reason.too_small


def test_too_small_counts_the_short_side() -> None:
    """A 4000×7 strip is too_small at min_side=8, while a 4000×120 banner is accepted."""
    limits = ImagingConfig(max_pixels=100_000_000, min_side=8)
    assert _reason(_encode(Image.new("RGB", (4000, 7)), "PNG"), limits) == Reason.too_small
    out = decode_image(_encode(Image.new("RGB", (4000, 120), (9, 9, 9)), "PNG"), limits)
    assert out.size == (4000, 120) and out.mode == "RGB"


# --- crop -------------------------------------------------------------------------------------------


def test_crop_box_cuts_normalized_region() -> None:
    """Crop (0.25, 0.25, 0.5, 0.5) of a 200×100 image is its 100×50 centre."""
    img = photo(200, 100, seed=10)
    out = apply_crop(img, CropBox(x=0.25, y=0.25, w=0.5, h=0.5))
    assert out.size == (100, 50)
    assert np.array_equal(np.asarray(out), np.asarray(img)[25:75, 50:150])


def test_crop_none_returns_the_same_image() -> None:
    """No crop box returns the image itself, untouched."""
    img = photo(50, 40, seed=11)
    assert apply_crop(img, None) is img


def test_full_crop_keeps_the_whole_image() -> None:
    """The crop box (0, 0, 1, 1) keeps every pixel."""
    img = photo(37, 23, seed=12)
    out = apply_crop(img, CropBox(x=0.0, y=0.0, w=1.0, h=1.0))
    assert np.array_equal(np.asarray(out), np.asarray(img))
