"""decode_image and apply_crop: bytes to 8-bit RGB, or a typed rejection with the right reason."""

from __future__ import annotations

import io
import struct
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageCms, features

from config.settings import ImagingConfig
from schemas.events import CropBox
from schemas.reasons import Reason
from tests.helpers import photo
from worker.errors import PermanentError
from worker.imaging.decode import ALLOWED_FORMATS, accepted_formats, apply_crop, decode_image

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


@pytest.mark.parametrize("cut", [600, 1500, 2500])
def test_jpeg_cut_inside_a_header_segment_is_truncated(cut: int) -> None:
    """A JPEG cut off inside a long header segment (a 3 kB ICC profile in APP2) is truncated, not corrupt."""
    data = _encode(photo(64, 48, seed=32), "JPEG", quality=90, icc_profile=b"\0" * 3000)
    assert data.find(b"ICC_PROFILE") < cut < data.find(b"ICC_PROFILE") + 3000
    assert _reason(data[:cut]) == Reason.truncated


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


@pytest.mark.parametrize(("width", "height"), [(3000, 2000), (5000, 5000)])
def test_a_bomb_is_reported_against_the_setting(width: int, height: int) -> None:
    """Past twice the limit Pillow raises with its own threshold ("exceeds limit of 2000000 pixels"),
    not the setting's; the detail names the picture's pixels and IMGSYNC_MAX_IMAGE_PIXELS."""
    with pytest.raises(PermanentError) as info:
        decode_image(_header_only_png(width, height), ImagingConfig(max_pixels=1_000_000, min_side=8))
    assert str(info.value).endswith(f"{width * height} pixels is over IMGSYNC_MAX_IMAGE_PIXELS=1000000"), str(info.value)


def test_a_damaged_file_reads_the_same_every_time() -> None:
    """Pillow's "cannot identify image file <_io.BytesIO object at 0x…>" named a new address for
    each attempt at one file; the detail now names the format alone."""
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    details = set()
    for _ in range(2):
        with pytest.raises(PermanentError) as info:
            decode_image(data, LIMITS)
        details.add(str(info.value))
    assert len(details) == 1 and "0x" not in details.pop()


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


# --- colour management (embedded ICC profiles) ------------------------------------------------------
# ImageCms cannot create CMYK or wide-gamut RGB profiles, so the tests assemble small ICC v2
# profiles byte by byte (ICC.1:2001-04): a matrix/shaper RGB profile and a CMYK→Lab lut8 profile.

_D50 = (0.9642, 1.0, 0.8249)
#: Adobe RGB (1998) primaries adapted to D50, and its 563/256 gamma
_ADOBE_COLORANTS = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
_ADOBE_GAMMA = 563 / 256
#: sRGB primaries adapted to D50 (as LittleCMS's built-in sRGB profile stores them)
_SRGB_COLORANTS = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def _s15f16(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz_tag(xyz: tuple[float, float, float]) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15f16(v) for v in xyz)


def _desc_tag(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    # textDescriptionType: ASCII part, then empty Unicode and ScriptCode parts
    return b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 8 + b"\0" * 3 + b"\0" * 67


def _icc(device_class: bytes, colour_space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """An ICC v2.1 profile: 128-byte header, tag table, 4-byte aligned tag data."""
    offset = 128 + 4 + 12 * len(tags)
    table, blob = b"", b""
    for sig, body in tags:
        blob += b"\0" * (-(offset + len(blob)) % 4)
        table += sig + struct.pack(">II", offset + len(blob), len(body))
        blob += body
    body = struct.pack(">I", len(tags)) + table + blob
    header = (
        struct.pack(">I", 128 + len(body)) + b"lcms" + struct.pack(">I", 0x02100000)
        + device_class + colour_space + pcs + b"\0" * 12 + b"acsp" + b"APPL" + b"\0" * 4
        + b"\0" * 16 + struct.pack(">I", 0) + b"".join(_s15f16(v) for v in _D50) + b"\0" * 48
    )  # fmt: skip
    assert len(header) == 128
    return header + body


def _rgb_profile(name: str, colorants: tuple[tuple[float, float, float], ...], gamma: float) -> bytes:
    """A matrix/shaper RGB profile with the given D50 colorants and a pure gamma curve."""
    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256))
    return _icc(
        b"mntr",
        b"RGB ",
        b"XYZ ",
        [(b"desc", _desc_tag(name)), (b"wtpt", _xyz_tag(_D50))]
        + [(sig, _xyz_tag(c)) for sig, c in zip((b"rXYZ", b"gXYZ", b"bXYZ"), colorants, strict=True)]
        + [(sig, curve) for sig in (b"rTRC", b"gTRC", b"bTRC")],
    )


def _lab8(colours: list[tuple[int, int, int]]) -> np.ndarray:
    """sRGB colours → ICC v2 8-bit Lab (L·255/100, a+128, b+128)."""
    img = Image.new("RGB", (len(colours), 1))
    img.putdata(colours)
    srgb, lab_profile = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    lab = ImageCms.profileToProfile(img, srgb, lab_profile, outputMode="LAB")
    out = np.asarray(lab).reshape(-1, 3).copy()
    out[:, 1:] ^= 0x80  # Pillow's LAB output holds a/b as signed bytes
    return out


def _cmyk_profile(name: str, ink_colour) -> bytes:
    """A CMYK→Lab profile (lut8, 2 grid points): the solid-ink corner (c, m, y, k) ∈ {0, 1}⁴ shows
    the sRGB colour ``ink_colour(c, m, y, k)``; in between it interpolates."""
    corners = [(c, m, y, k) for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1)]
    identity = bytes(range(256))
    lut = (
        b"mft1" + b"\0" * 4 + bytes([4, 3, 2, 0])
        + b"".join(_s15f16(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
        + identity * 4 + _lab8([ink_colour(*q) for q in corners]).astype(np.uint8).tobytes() + identity * 3
    )  # fmt: skip
    return _icc(b"prtr", b"CMYK", b"Lab ", [(b"desc", _desc_tag(name)), (b"wtpt", _xyz_tag(_D50)), (b"A2B0", lut)])


def _naive_ink(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    return (255 * (1 - c) * (1 - k), 255 * (1 - m) * (1 - k), 255 * (1 - y) * (1 - k))


def _rotated_ink(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    """A deliberately odd press: every ink shows the naive colour with R, G, B rotated (R←B, G←R, B←G)."""
    r, g, b = _naive_ink(c, m, y, k)
    return (b, r, g)


def _two_inks_cmyk() -> Image.Image:
    """Left half cyan+yellow (green), right half magenta+yellow (red)."""
    img = Image.new("CMYK", (24, 24), (0, 255, 255, 0))
    img.paste((255, 0, 255, 0), (0, 0, 12, 24))
    return img


def _without_jpeg_segment(data: bytes, marker: int) -> bytes:
    """``data`` with every marker segment ``0xFFmarker`` before the first scan removed."""
    out, at = bytearray(data[:2]), 2
    while at < len(data):
        kind = data[at + 1]
        if kind == 0xDA:  # start of scan: the rest is entropy-coded data
            return bytes(out + data[at:])
        length = struct.unpack(">H", data[at + 2 : at + 4])[0]
        if kind != marker:
            out += data[at : at + 2 + length]
        at += 2 + length
    raise AssertionError("no start of scan")


def _srgb_expected(adobe_rgb: np.ndarray) -> np.ndarray:
    """Adobe RGB values → sRGB by the textbook arithmetic (linearize, matrices, clip, sRGB curve)."""
    linear = (adobe_rgb / 255.0) ** _ADOBE_GAMMA
    srgb_linear = np.clip(linear @ np.array(_ADOBE_COLORANTS) @ np.linalg.inv(np.array(_SRGB_COLORANTS)), 0, 1)
    encoded = np.where(srgb_linear <= 0.0031308, 12.92 * srgb_linear, 1.055 * srgb_linear ** (1 / 2.4) - 0.055)
    return np.rint(encoded * 255).astype(int)


_ADOBE_SWATCHES = np.array(
    [(60, 180, 90), (120, 140, 160), (200, 60, 60), (128, 128, 128), (30, 40, 200), (255, 255, 255), (0, 0, 0)],
    np.uint8,
)


def test_wide_gamut_rgb_profile_is_converted_to_srgb() -> None:
    """An RGB PNG tagged Adobe RGB (1998) decodes to the sRGB values colour science gives (±2)."""
    profile = _rgb_profile("Adobe RGB (1998) test profile", _ADOBE_COLORANTS, _ADOBE_GAMMA)
    swatches = np.repeat(np.repeat(_ADOBE_SWATCHES[None], 8, axis=0), 8, axis=1)  # 8×8 px each
    data = _encode(Image.fromarray(swatches), "PNG", icc_profile=profile)

    out = np.asarray(decode_image(data, LIMITS))[4, 4::8].astype(int)

    expected = _srgb_expected(_ADOBE_SWATCHES.astype(np.float64))
    assert np.abs(out - expected).max() <= 2
    assert np.abs(out - _ADOBE_SWATCHES.astype(int)).max() >= 30  # (200, 60, 60) → (231, 57, 57): it did convert


def test_wide_gamut_profile_with_alpha_converts_then_composites() -> None:
    """An RGBA PNG tagged Adobe RGB: opaque pixels are converted to sRGB, transparent ones are white."""
    profile = _rgb_profile("Adobe RGB (1998) test profile", _ADOBE_COLORANTS, _ADOBE_GAMMA)
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[...] = (200, 60, 60, 255)
    arr[0, 0] = (200, 60, 60, 0)
    data = _encode(Image.fromarray(arr, "RGBA"), "PNG", icc_profile=profile)

    px = np.asarray(decode_image(data, LIMITS)).astype(int)

    assert tuple(px[0, 0]) == (255, 255, 255)
    assert np.abs(px[4, 4] - _srgb_expected(np.array([200.0, 60.0, 60.0]))).max() <= 2


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_srgb_profile_is_a_no_op(fmt: str) -> None:
    """An image tagged with an sRGB profile decodes to exactly the pixels of the same file untagged."""
    img = photo(64, 48, seed=21)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = decode_image(_encode(img, fmt, icc_profile=srgb, quality=95), LIMITS)
    plain = decode_image(_encode(img, fmt, quality=95), LIMITS)
    assert np.array_equal(np.asarray(tagged), np.asarray(plain))


def test_cmyk_jpeg_with_profile_follows_the_profile() -> None:
    """A CMYK JPEG's embedded profile decides its colours: with an odd press profile, C+Y shows blue
    and M+Y shows green (where a plain conversion gives green and red)."""
    data = _encode(_two_inks_cmyk(), "JPEG", quality=95, icc_profile=_cmyk_profile("odd press", _rotated_ink))

    px = np.asarray(decode_image(data, LIMITS)).astype(int)

    assert np.abs(px[12, 4] - (0, 0, 255)).max() <= 12
    assert np.abs(px[12, 20] - (0, 255, 0)).max() <= 12


def test_cmyk_jpeg_with_plain_press_profile_gives_sane_rgb() -> None:
    """A CMYK JPEG with a profile that prints inks as their textbook colours decodes green and red."""
    data = _encode(_two_inks_cmyk(), "JPEG", quality=95, icc_profile=_cmyk_profile("plain press", _naive_ink))

    px = np.asarray(decode_image(data, LIMITS)).astype(int)

    assert np.abs(px[12, 4] - (0, 255, 0)).max() <= 12
    assert np.abs(px[12, 20] - (255, 0, 0)).max() <= 12


@pytest.mark.parametrize("orientation", [1, 6])
def test_cmyk_jpeg_without_adobe_marker_is_read_uninverted(orientation: int) -> None:
    """A CMYK JPEG without Adobe's APP14 marker stores plain (not inverted) ink values and decodes to
    the same colours as Pillow's own (Adobe-marked, inverted) CMYK JPEG, EXIF-rotated or not."""
    img = _two_inks_cmyk()
    exif = Image.Exif()
    exif[0x0112] = orientation
    # Pillow stores 255 - v (Adobe polarity): saving the inverse stores the plain values
    adobe = _encode(ImageChops.invert(img), "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(adobe)).info.get("adobe") is not None
    plain = _without_jpeg_segment(adobe, 0xEE)
    assert "adobe" not in Image.open(io.BytesIO(plain)).info

    out = decode_image(plain, LIMITS)

    reference = decode_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()), LIMITS)
    assert out.size == reference.size
    assert _mean_abs_diff(out, reference) < 3.0
    px = np.asarray(reference.transpose(Image.Transpose.ROTATE_90) if orientation == 6 else reference).astype(int)
    assert np.abs(px[12, 4] - (0, 255, 0)).max() <= 8


_FORMAT_CASES = [
    pytest.param("PNG", photo(32, 24, seed=22), id="png-rgb"),
    pytest.param("JPEG", photo(32, 24, seed=23), id="jpeg-rgb"),
    pytest.param("JPEG", _two_inks_cmyk(), id="jpeg-cmyk"),
    pytest.param("PNG", photo(32, 24, seed=24, mode="L"), id="png-gray"),
    pytest.param("WEBP", photo(32, 24, seed=25), id="webp"),
    pytest.param("TIFF", photo(32, 24, seed=26), id="tiff"),
]


def _assert_decodes_as_untagged(fmt: str, img: Image.Image, icc: bytes) -> None:
    untagged = decode_image(_encode(img, fmt, quality=95), LIMITS)
    out = decode_image(_encode(img, fmt, quality=95, icc_profile=icc), LIMITS)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(untagged))


@pytest.mark.parametrize(("fmt", "img"), _FORMAT_CASES)
@pytest.mark.parametrize(
    "icc",
    [
        pytest.param(b"garbage", id="garbage"),
        pytest.param(b"\0" * 200, id="zeros"),
        pytest.param(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()[:300], id="cut-short"),
    ],
)
def test_broken_profile_falls_back_to_plain_conversion(fmt: str, img: Image.Image, icc: bytes) -> None:
    """An unreadable ICC profile does not fail the image: it decodes as if it had no profile."""
    _assert_decodes_as_untagged(fmt, img, icc)


@pytest.mark.parametrize(
    ("fmt", "img", "icc"),
    [
        pytest.param("JPEG", _two_inks_cmyk(), _rgb_profile("rgb", _ADOBE_COLORANTS, 2.2), id="rgb-profile-on-cmyk"),
        pytest.param(
            "PNG", photo(32, 24, seed=27, mode="L"), _rgb_profile("rgb", _ADOBE_COLORANTS, 2.2), id="rgb-on-gray"
        ),
        pytest.param("PNG", photo(32, 24, seed=28), _cmyk_profile("press", _naive_ink), id="cmyk-profile-on-rgb"),
        pytest.param("TIFF", photo(32, 24, seed=29), _cmyk_profile("press", _naive_ink), id="cmyk-profile-on-rgb-tiff"),
    ],
)
def test_mismatched_profile_falls_back_to_plain_conversion(fmt: str, img: Image.Image, icc: bytes) -> None:
    """A profile for another colour space than the pixels (RGB profile on CMYK or gray, CMYK profile
    on RGB) is ignored: the image decodes as if it had no profile."""
    _assert_decodes_as_untagged(fmt, img, icc)


def test_gray_image_with_gray_profile_is_converted() -> None:
    """A grayscale PNG tagged with a linear-light gray profile decodes to the sRGB-encoded gray
    (linear 128/255 → sRGB 188), not to the stored value 128."""
    linear_gray = _icc(
        b"mntr",
        b"GRAY",
        b"XYZ ",
        [
            (b"desc", _desc_tag("Gray gamma 1.0")),
            (b"wtpt", _xyz_tag(_D50)),
            (b"kTRC", b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 256)),
        ],
    )
    arr = np.full((8, 8), 128, np.uint8)
    arr[0, 0], arr[0, 1] = 0, 255
    data = _encode(Image.fromarray(arr, "L"), "PNG", icc_profile=linear_gray)

    px = np.asarray(decode_image(data, LIMITS)).astype(int)

    assert np.abs(px[4, 4] - 188).max() <= 2
    assert tuple(px[0, 0]) == (0, 0, 0)
    assert np.abs(px[0, 1] - 255).max() <= 1


def test_cielab_tiff_becomes_rgb() -> None:
    """A CIELab TIFF decodes to RGB: neutral Lab (L=50, a=b=0) is mid gray (119, sRGB of L*=50)."""
    data = _encode(Image.new("LAB", (8, 8), (128, 128, 128)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"

    px = np.asarray(decode_image(data, LIMITS)).astype(int)

    assert np.abs(px - 119).max() <= 2


def _png16_rgb(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    rows = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def test_16bit_rgb_png_is_scaled_not_clipped() -> None:
    """A 48-bit RGB PNG is scaled to 8 bits: 65535 → 255, 32768 → 128, 1024 → 4 (not clipped to 255)."""
    arr = np.zeros((8, 8, 3), np.uint16)
    arr[0, 0] = (65535, 32768, 1024)
    arr[0, 1] = (0, 65535, 256)

    px = np.asarray(decode_image(_png16_rgb(arr), LIMITS)).astype(int)

    assert np.abs(px[0, 0] - (255, 128, 4)).max() <= 1
    assert np.abs(px[0, 1] - (0, 255, 1)).max() <= 1
    assert tuple(px[4, 4]) == (0, 0, 0)


# --- optional formats -------------------------------------------------------------------------------


def test_avif_is_accepted_when_pillow_reads_it() -> None:
    """AVIF is in the allowlist exactly when this Pillow has a working AVIF codec (Pillow ≥ 11.2)."""
    Image.init()
    assert ("AVIF" in ALLOWED_FORMATS) == ("AVIF" in Image.OPEN and features.check("avif"))
    assert "AVIF" in accepted_formats()  # the Pillow this project pins (>= 12) has it


def test_avif_round_trip() -> None:
    """An AVIF file decodes to its picture (RGB, same size, close pixels)."""
    img = photo(64, 48, seed=30)
    data = _encode(img, "AVIF", quality=90)

    out = decode_image(data, LIMITS)

    assert out.mode == "RGB" and out.size == (64, 48)
    assert _mean_abs_diff(out, img) < 6.0


def test_heif_without_pillow_heif_is_unsupported_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the optional pillow-heif package a HEIC file is unsupported_format, and the message
    says which package would accept it."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails, whatever is installed
    accepted_formats.cache_clear()
    heic = struct.pack(">I", 24) + b"ftypheic" + struct.pack(">I", 0) + b"mif1heic" + b"\0" * 64
    try:
        assert "HEIF" not in accepted_formats()
        with pytest.raises(PermanentError) as info:
            decode_image(heic, LIMITS)
    finally:
        accepted_formats.cache_clear()

    assert info.value.reason == Reason.unsupported_format
    assert "pillow-heif" in str(info.value)


def test_damaged_avif_is_corrupt() -> None:
    """A file with an AVIF signature that cannot be parsed is corrupt, not unsupported."""
    data = _encode(photo(32, 24, seed=31), "AVIF", quality=80)
    assert _reason(data[:40]) in (Reason.corrupt, Reason.truncated)


def test_damaged_avif_with_generic_major_brand_is_corrupt() -> None:
    """A damaged AVIF whose ftyp major brand is the generic "mif1" (AVIF only among the compatible
    brands) is still recognised as AVIF: cut short it is truncated, garbled it is corrupt, never
    unsupported."""
    data = _encode(photo(32, 24, seed=33), "AVIF", quality=80)
    assert data[4:12] == b"ftypavif"
    generic = data[:8] + b"mif1" + data[12:]
    assert decode_image(generic, LIMITS).size == (32, 24)  # undamaged, it decodes
    assert _reason(generic[:60]) == Reason.truncated
    mdat = generic.index(b"mdat") + 4
    garbled = generic[:mdat] + b"\xee" * (len(generic) - mdat)
    assert _reason(garbled) == Reason.corrupt


def test_reduced_scale_jpeg_decode_keeps_vectors(tiny_encoder) -> None:
    """A large JPEG decoded at reduced DCT scale (min_side) is smaller but gives the model the same
    picture: vector cos >= 0.999 to the full decode; small or non-JPEG images are decoded in full."""
    big = photo(600, 450, seed=11).resize((2400, 1800), Image.Resampling.BICUBIC)
    data = _encode(big, "JPEG", quality=90)
    full = decode_image(data, LIMITS)
    reduced = decode_image(data, LIMITS, min_side=192)
    assert full.size == (2400, 1800) and reduced.size == (300, 225)  # 1/8 scale still keeps both sides >= 192
    va = tiny_encoder.encode(tiny_encoder.preprocess([full]))
    vb = tiny_encoder.encode(tiny_encoder.preprocess([reduced]))
    assert float((va * vb).sum()) >= 0.999
    assert decode_image(data, LIMITS, min_side=1500).size == (2400, 1800)  # not 2x larger than needed
    png = _encode(big, "PNG")
    assert decode_image(png, LIMITS, min_side=192).size == (2400, 1800)
