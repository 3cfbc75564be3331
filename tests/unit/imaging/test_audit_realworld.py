"""Real-world files the decoder and the model geometry once got wrong: colour-keyed PNGs, images
between Pillow's default bomb limit and IMGSYNC_MAX_IMAGE_PIXELS, long thin strips, cut WebPs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from config.settings import ImagingConfig
from schemas.reasons import Reason
from tests.helpers import photo
from worker.encoders.base import PreprocessCfg
from worker.errors import PermanentError
from worker.imaging import geometry
from worker.imaging.decode import decode_image
from worker.imaging.device_decode import plan_handoff
from worker.imaging.geometry import apply_geometry, crop_origin, short_side_size

LIMITS = ImagingConfig(max_pixels=100_000_000, min_side=8)
CFG = PreprocessCfg(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _browser_view(data: bytes) -> np.ndarray:
    """What a browser shows: upright, transparency (a colour key included) over white."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    rgba = img.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


def _keyed(mode: str) -> Image.Image:
    arr = np.asarray(photo(64, 48, seed=5).convert("L" if mode in ("L", "1") else "RGB")).copy()
    arr[:16, :24] = 0  # the key colour: black
    img = Image.fromarray(arr)
    return img.convert("1") if mode == "1" else img


@pytest.mark.parametrize(
    ("mode", "key"), [("RGB", (0, 0, 0)), ("L", 0), ("1", 0)], ids=["rgb", "grey", "bilevel"]
)
@pytest.mark.parametrize("orientation", [1, 6])
def test_png_colour_key_is_transparent(mode: str, key: object, orientation: int) -> None:
    """A grey, RGB or 1-bit PNG with a tRNS colour key (optipng's form of on/off alpha) shows its
    keyed pixels as white, like a browser, not as the key colour."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_keyed(mode), "PNG", transparency=key, exif=exif)
    out = np.asarray(decode_image(data, LIMITS))
    assert np.array_equal(out, _browser_view(data))
    assert (out == 255).all(axis=-1).sum() >= 16 * 24


def test_16bit_grey_png_colour_key_is_matched_before_scaling() -> None:
    """A 16-bit grey PNG's tRNS key names a 16-bit value: exactly those pixels become white."""
    arr = np.full((32, 40), 30000, np.uint16)
    arr[:8, :8] = 1234
    arr[8:16, :8] = 1235  # one step off the key (same 8-bit value after scaling): stays opaque
    out = np.asarray(decode_image(_encode(Image.fromarray(arr), "PNG", transparency=1234), LIMITS))
    assert (out[:8, :8] == 255).all()
    assert (out[8:16, :8] == round(1235 * 255 / 65535)).all()
    assert (out[16:, :] == round(30000 * 255 / 65535)).all()


def _png48(arr: np.ndarray, key: tuple[int, int, int]) -> bytes:
    """A 16-bit RGB PNG with a tRNS colour key, written chunk by chunk (Pillow cannot write 16-bit RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    h, w, _ = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"tRNS", struct.pack(">HHH", *key))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16bit_rgb_png_colour_key_is_transparent() -> None:
    """A 16-bit RGB PNG's tRNS key names 16-bit values; Pillow reads the pixels as 8 bits, and the
    key used to match nothing (the keyed area stayed the key colour). Now the keyed pixels are white
    and the others keep their colour."""
    arr = np.empty((32, 40, 3), np.uint16)
    arr[...] = (0x8000, 0x4000, 0x2000)
    arr[:8, :8] = (0x1234, 0x5678, 0x9ABC)  # the key colour
    out = np.asarray(decode_image(_png48(arr, (0x1234, 0x5678, 0x9ABC)), LIMITS))
    assert (out[:8, :8] == 255).all()
    assert (out[8:, :] == (0x80, 0x40, 0x20)).all() and (out[:8, 8:] == (0x80, 0x40, 0x20)).all()
    # a 16-bit key whose values all fit in 8 bits (near black) keys those pixels, not 8-bit values
    arr[:8, :8] = (0x0010, 0x0010, 0x0010)
    arr[8:16, :8] = (0x1010, 0x1010, 0x1010)  # 8-bit 0x10 everywhere: stays opaque
    out = np.asarray(decode_image(_png48(arr, (0x0010, 0x0010, 0x0010)), LIMITS))
    assert (out[:8, :8] == 255).all() and (out[8:16, :8] == 0x10).all()


def test_configured_pixel_limit_governs_not_pillows_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image under IMGSYNC_MAX_IMAGE_PIXELS decodes even when Pillow's own bomb limit (89.5 MP by
    default, which refused 90–100 MP photos under the default 100 MP setting) is lower; over the
    setting it is a decompression_bomb; Pillow's limit is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for Pillow's 89.5 MP
    data = _encode(photo(100, 100, seed=3), "PNG")  # 10,000 px: over Pillow's, 10× (error) included
    assert decode_image(data, ImagingConfig(max_pixels=50_000, min_side=8)).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(PermanentError) as info:
        decode_image(data, ImagingConfig(max_pixels=9_999, min_side=8))
    assert info.value.reason == Reason.decompression_bomb
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("size", [(8, 200_000), (300_000, 9), (20, 600_000)])
def test_long_thin_picture_is_fitted_without_a_huge_intermediate(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An 8×200000 strip (a few kilobytes of PNG) is fitted to the model without resizing all of it to
    224×5.6 million pixels first: no resize makes more than CROP_FIRST_RATIO × the model input."""
    real = Image.Image.resize
    biggest = geometry.CROP_FIRST_RATIO * 224 * 224

    def bounded(self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object) -> Image.Image:
        assert size[0] * size[1] <= biggest, f"resize to {size} would allocate {size[0] * size[1]} pixels"
        return real(self, size, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "resize", bounded)
    out = apply_geometry(Image.new("RGB", size, (200, 30, 10)), CFG)
    assert out.shape == (224, 224, 3) and (out == (200, 30, 10)).all()


@pytest.mark.parametrize("size", [(8, 1000), (1500, 10), (12, 5000)])
def test_long_thin_picture_matches_resize_then_crop(size: tuple[int, int]) -> None:
    """The bounded path for a long, thin picture gives the reference's pixels up to rounding."""
    img = photo(*size, seed=7)
    nw, nh = short_side_size(*size, 224)
    full = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = crop_origin(nw, nh, (224, 224))
    ref = np.asarray(full.crop((left, top, left + 224, top + 224)), dtype=np.int16)
    out = apply_geometry(img, CFG).astype(np.int16)
    assert np.abs(out - ref).mean() < 0.5


def test_long_thin_jpeg_is_decoded_by_preprocess() -> None:
    """With IMGSYNC_JPEG_DECODE=encoder, a long, thin JPEG is not handed to the device decoder (whose
    resize would build the whole strip at the model's scale); an ordinary one still is."""
    limits = ImagingConfig(max_pixels=100_000_000, min_side=8, jpeg_decode="encoder")
    thin = _encode(photo(16, 16 * (geometry.CROP_FIRST_RATIO + 1), seed=2), "JPEG")
    assert plan_handoff(thin, limits, CFG, max_bytes=2**24) is None
    assert plan_handoff(_encode(photo(160, 200, seed=2), "JPEG"), limits, CFG, max_bytes=2**24) is not None


@pytest.mark.parametrize("lossless", [False, True], ids=["lossy", "lossless"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_cut_webp_is_truncated(lossless: bool, keep: float) -> None:
    """A WebP cut short (its RIFF header declares more bytes than arrived) is truncated, not corrupt."""
    data = _encode(photo(320, 240, seed=4), "WEBP", lossless=lossless, quality=90)
    with pytest.raises(PermanentError) as info:
        decode_image(data[: int(len(data) * keep)], LIMITS)
    assert info.value.reason == Reason.truncated


def test_damaged_but_complete_webp_is_still_corrupt() -> None:
    """A WebP of its declared length whose image data is garbage stays corrupt."""
    data = bytearray(_encode(photo(64, 48, seed=4), "WEBP", quality=90))
    data[40:] = b"\x5a" * (len(data) - 40)
    with pytest.raises(PermanentError) as info:
        decode_image(bytes(data), LIMITS)
    assert info.value.reason == Reason.corrupt


def _png_with_chunk(img: Image.Image, chunk_type: bytes, payload: bytes) -> bytes:
    """``img`` as a PNG with one extra ancillary chunk inserted after IHDR."""
    import struct
    import zlib

    data = _encode(img, "PNG")
    ihdr_end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I", len(payload)) + chunk_type + payload
    chunk += struct.pack(">I", zlib.crc32(chunk_type + payload) & 0xFFFFFFFF)
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def _raw_profile(size: int) -> bytes:
    """ImageMagick's form of an embedded profile: hex text in a zTXt chunk, twice the profile's size."""
    import zlib

    body = np.random.default_rng(1).integers(0, 256, size // 2, dtype=np.uint8).tobytes().hex()
    return b"Raw profile type xmp\0\0" + zlib.compress(f"\nxmp\n{len(body) // 2:8d}\n{body}\n".encode())


@pytest.mark.parametrize(
    ("chunk_type", "payload"),
    [
        (b"zTXt", _raw_profile(3 * 2**20)),  # a 1.5 MB XMP packet, as ImageMagick stores it
        (b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + __import__("zlib").compress(b"<x>" + b"a" * 5 * 2**20 + b"</x>")),
    ],
    ids=["zTXt-raw-profile", "iTXt-compressed-xmp"],
)
def test_png_with_megabytes_of_metadata_decodes(chunk_type: bytes, payload: bytes) -> None:
    """A PNG whose compressed text chunk inflates past Pillow's 1 MB MAX_TEXT_CHUNK (bloated XMP,
    ImageMagick's hex "Raw profile" chunks) is an ordinary picture, not corrupt; the limit is left as
    it was."""
    from PIL import PngImagePlugin

    before = PngImagePlugin.MAX_TEXT_CHUNK
    img = photo(64, 48, seed=9)
    out = decode_image(_png_with_chunk(img, chunk_type, payload), LIMITS)
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))
    assert PngImagePlugin.MAX_TEXT_CHUNK == before


def test_png_text_bomb_is_still_refused() -> None:
    """A zTXt chunk inflating past every sane size (here 200 MB from 200 kB) is still refused: the
    raised limit bounds memory, it does not remove the guard."""
    import zlib

    bomb = b"Comment\0\0" + zlib.compress(b"\0" * 200 * 2**20, 9)
    with pytest.raises(PermanentError) as info:
        decode_image(_png_with_chunk(photo(64, 48, seed=9), b"zTXt", bomb), LIMITS)
    assert info.value.reason == Reason.decompression_bomb


_CONTAINERS = {
    "jpeg": ("JPEG", {"quality": 90}),
    "jpeg-progressive": ("JPEG", {"quality": 90, "progressive": True}),
    "png": ("PNG", {}),
    "gif": ("GIF", {}),
    "tiff-lzw": ("TIFF", {"compression": "tiff_lzw"}),
    "tiff-deflate": ("TIFF", {"compression": "tiff_adobe_deflate"}),
    "tiff-raw": ("TIFF", {}),
    "bmp": ("BMP", {}),
    "webp": ("WEBP", {"quality": 90}),
    "avif": ("AVIF", {"quality": 80}),
}


def _container(name: str) -> bytes:
    fmt, params = _CONTAINERS[name]
    if fmt == "AVIF" and "AVIF" not in Image.SAVE:
        pytest.skip("this Pillow cannot write AVIF")
    img = photo(320, 240, seed=4)
    if fmt == "JPEG":  # an ICC profile makes a long header segment to cut inside
        from PIL import ImageCms

        params = {**params, "icc_profile": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()}
    return _encode(img, fmt, **params)


@pytest.mark.parametrize("keep", [0.02, 0.1, 0.3, 0.5, 0.8, 0.95, 0.99])
@pytest.mark.parametrize("name", sorted(_CONTAINERS))
def test_file_cut_anywhere_is_truncated(name: str, keep: float) -> None:
    """A file cut short anywhere, inside its headers too (a TIFF whose directory is at its end, an
    AVIF's boxes, a GIF's colour table), is truncated: the decoder's message said 'cannot identify'
    for those, which made them corrupt."""
    data = _container(name)
    with pytest.raises(PermanentError) as info:
        decode_image(data[: max(int(len(data) * keep), 16)], LIMITS)
    assert info.value.reason == Reason.truncated, str(info.value)


def _coded_span(data: bytes, fmt: str) -> tuple[int, int]:
    """Where ``data`` keeps its coded pixels (not its headers): the part a garbling may touch."""
    if fmt == "PNG":
        at = data.index(b"IDAT") + 4
        return at, at + int.from_bytes(data[at - 8 : at - 4], "big")
    if fmt == "TIFF":
        tags = Image.open(io.BytesIO(data)).tag_v2
        return tags[273][0], tags[273][0] + tags[279][0]
    if fmt == "AVIF":
        return data.index(b"mdat") + 4, len(data)
    if fmt == "JPEG":
        return data.rindex(b"\xff\xda") + 16, len(data) - 2
    return len(data) // 3, 2 * len(data) // 3


@pytest.mark.parametrize("name", sorted(_CONTAINERS))
def test_garbled_but_whole_file_is_corrupt(name: str) -> None:
    """A file of its full length whose headers are intact but whose coded data is overwritten is
    corrupt (or still decodes), never truncated: the structure check only calls a file cut when it is."""
    from worker.imaging.containers import cut_short

    fmt = _CONTAINERS[name][0]
    data = bytearray(_container(name))
    assert not cut_short(bytes(data))  # a whole file is never called cut
    start, end = _coded_span(bytes(data), fmt)
    data[start:end] = bytes((7 * i + 3) & 0xFF for i in range(end - start))
    try:
        decode_image(bytes(data), LIMITS)
    except PermanentError as exc:
        assert exc.reason == Reason.corrupt, str(exc)


@pytest.mark.parametrize("name", ["tiff-lzw", "tiff-deflate", "tiff-raw"])
def test_tiff_cut_in_its_last_bytes_is_truncated(name: str) -> None:
    """A TIFF whose directory (with its next-directory offset and the values stored after it) is at
    the end, cut by its last 1 to 30 bytes, is truncated."""
    data = _container(name)
    for cut in range(1, 31):
        with pytest.raises(PermanentError) as info:
            decode_image(data[:-cut], LIMITS)
        assert info.value.reason == Reason.truncated, (cut, str(info.value))


def test_structure_edges_are_told_right() -> None:
    """A JPEG that ends (EOI) before any scan was not cut; an AVIF cut at a box boundary, before its
    coded picture arrived, was."""
    from worker.imaging.containers import cut_short

    jpeg = _container("jpeg")
    assert not cut_short(jpeg[: jpeg.index(b"\xff\xda")] + b"\xff\xd9")
    assert not cut_short(b"\xff\xd8\xff\xd9")
    if "AVIF" in Image.SAVE:
        avif = _container("avif")
        assert cut_short(avif[: avif.index(b"mdat") - 4])  # every box before the coded picture, whole
