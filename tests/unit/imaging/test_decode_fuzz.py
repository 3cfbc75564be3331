"""decode_image under damaged input: mutated bytes of valid JPEG/PNG/GIF/WebP/TIFF/BMP/AVIF files
either decode to an RGB picture or are refused with a PermanentError, never another exception, and
never slowly."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms

from config.settings import ImagingConfig
from tests.helpers import photo
from tests.unit.imaging.test_decode import _ADOBE_COLORANTS, _cmyk_profile, _naive_ink, _rgb_profile
from worker.errors import PermanentError
from worker.imaging.decode import decode_image

LIMITS = ImagingConfig(max_pixels=10_000_000, min_side=1)

FUZZ = settings(
    max_examples=35,
    deadline=2000,  # ms per call: a mutated header must not make decoding crawl
    derandomize=True,  # the same examples on every run: CI stays stable
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _seeds() -> dict[str, list[bytes]]:
    """Small valid files of each accepted format, in several of its variants."""
    rgb = photo(40, 28, seed=1)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [photo(24, 16, seed=s) for s in (2, 3)]
    gif_anim = io.BytesIO()
    frames[0].save(gif_anim, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    srgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    adobe_icc = _rgb_profile("Adobe RGB (1998) test profile", _ADOBE_COLORANTS, 2.2)
    press_icc = _cmyk_profile("press", _naive_ink)
    gray16 = Image.fromarray((np.arange(20 * 12, dtype=np.uint16).reshape(12, 20) * 250).astype(np.uint16))
    return {
        "JPEG": [
            _save(rgb, "JPEG", quality=80),
            _save(rgb, "JPEG", quality=80, progressive=True, exif=exif.tobytes()),
            _save(rgb.convert("CMYK"), "JPEG", quality=80),
            _save(rgb.convert("L"), "JPEG", quality=80, icc_profile=b"garbage"),
            # embedded profiles are stored raw in APP2: mutations reach LittleCMS's parser
            _save(rgb, "JPEG", quality=80, icc_profile=adobe_icc),
            _save(rgb, "JPEG", quality=80, icc_profile=srgb_icc),
            _save(rgb.convert("CMYK"), "JPEG", quality=80, icc_profile=press_icc),
        ],
        "PNG": [
            _save(rgb, "PNG"),
            _save(rgba, "PNG"),
            _save(rgb.quantize(16), "PNG", transparency=0),
            _save(gray16, "PNG"),
            _save(rgba, "PNG", icc_profile=adobe_icc),
        ],
        "GIF": [_save(rgb.quantize(64), "GIF"), gif_anim.getvalue()],
        "WEBP": [_save(rgb, "WEBP", quality=70), _save(rgba, "WEBP", lossless=True, icc_profile=adobe_icc)],
        "TIFF": [
            _save(rgb, "TIFF"),
            _save(rgb, "TIFF", compression="tiff_deflate"),
            _save(rgba, "TIFF", compression="tiff_lzw"),
            _save(rgb.convert("CMYK"), "TIFF", icc_profile=press_icc),
            _save(gray16, "TIFF"),
        ],
        "BMP": [_save(rgb, "BMP"), _save(rgb.quantize(16), "BMP"), _save(rgba, "BMP")],
        "AVIF": [_save(rgb, "AVIF", quality=60)],
    }


SEEDS = _seeds()
ALL_SEEDS = [data for files in SEEDS.values() for data in files]

#: byte strings that make size and offset fields extreme
_INTERESTING = [
    b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff",
    b"\x7f\xff\xff\xff", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
]  # fmt: skip


def _with_png_crcs_fixed(data: bytes) -> bytes:
    """``data`` with every complete PNG chunk's CRC recomputed, so that damage inside chunks reaches
    the decoders instead of stopping at the CRC check."""
    out, at = bytearray(data), 8
    while at + 12 <= len(out):
        length = struct.unpack(">I", out[at : at + 4])[0]
        end = at + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(out[at + 4 : end]) & 0xFFFFFFFF)
        at = end + 4
    return bytes(out)


@st.composite
def _mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed file with 1–4 damages: flipped bytes, extreme values, cuts, inserted garbage,
    deleted or duplicated runs, or another file's header or tail spliced in."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        if n < 2:
            break
        # half the damage lands in bytes 8..63, where the headers and size fields are (the
        # signature itself is damaged by the other half, and that is mostly a plain refusal)
        at = draw(st.one_of(st.integers(min(8, n - 1), min(n, 64) - 1), st.integers(0, n - 1)))
        op = draw(st.sampled_from(["flip", "extreme", "truncate", "insert", "delete", "duplicate", "splice"]))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "extreme":
            value = draw(st.sampled_from(_INTERESTING))
            data[at : at + len(value)] = value
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        elif op == "duplicate":
            run = data[at : at + draw(st.integers(1, 64))]
            data[at:at] = run
        else:  # splice: this file's head with another file's tail, or the other way round
            other = draw(st.sampled_from(ALL_SEEDS))
            cut = draw(st.integers(0, len(other)))
            data = data[:at] + other[cut:] if draw(st.booleans()) else bytearray(other[:cut]) + data[at:]
    if data.startswith(b"\x89PNG\r\n\x1a\n") and draw(st.booleans()):
        return _with_png_crcs_fixed(bytes(data))
    return bytes(data)


def _decode_or_refuse(data: bytes) -> None:
    """The property: a picture in RGB within the limits, or a PermanentError (any other exception
    propagates and fails the test, with hypothesis showing the smallest such input)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd EXIF / metadata; not the point here
        try:
            img = decode_image(data, LIMITS)
        except PermanentError as exc:
            assert str(exc), "a refusal must say why"
            return
    assert img.mode == "RGB"
    assert min(img.size) >= LIMITS.min_side
    assert img.size[0] * img.size[1] <= LIMITS.max_pixels


def test_every_seed_decodes() -> None:
    """The undamaged seed files all decode (so the mutations start from valid files of each format)."""
    for fmt, files in SEEDS.items():
        for data in files:
            assert decode_image(data, LIMITS).mode == "RGB", fmt


@pytest.mark.parametrize("fmt", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_files_decode_or_are_refused(fmt: str, data: st.DataObject) -> None:
    """Damaged files of each format (7 formats × 35 examples) give RGB or PermanentError, each in < 2 s."""
    _decode_or_refuse(data.draw(_mutated(SEEDS[fmt]), label="file"))


@FUZZ
@given(
    head=st.sampled_from(ALL_SEEDS), tail=st.sampled_from(ALL_SEEDS), cut=st.integers(0, 200), at=st.integers(0, 4000)
)
def test_spliced_headers_decode_or_are_refused(head: bytes, tail: bytes, cut: int, at: int) -> None:
    """One format's header glued onto another file's body (40 examples) gives RGB or PermanentError."""
    _decode_or_refuse(head[: min(cut, len(head))] + tail[min(at, len(tail)) :])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff\xd8\xff", id="jpeg-soi-only"),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
        pytest.param(b"GIF89a" + struct.pack("<HH", 0xFFFF, 0xFFFF), id="gif-huge-screen"),
        pytest.param(b"RIFF\xff\xff\xff\xffWEBPVP8 ", id="webp-header-only"),
        pytest.param(b"II*\x00" + struct.pack("<I", 0xFFFFFFF0), id="tiff-ifd-past-end"),
        pytest.param(b"BM" + b"\xff" * 60, id="bmp-all-ones"),
    ],
)
def test_header_fragments_are_refused(data: bytes) -> None:
    """Bare signatures and absurd headers are refused with a PermanentError."""
    with warnings.catch_warnings(), pytest.raises(PermanentError):
        warnings.simplefilter("ignore")  # Pillow warns about the TIFF's unreadable EXIF first
        decode_image(data, LIMITS)
