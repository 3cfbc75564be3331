"""Bytes → a normalized RGB picture, or a typed rejection with a reason code.

Formats are decided from the bytes (an allowlist), decompression bombs are refused before pixels
are decoded, truncated files are refused (``LOAD_TRUNCATED_IMAGES`` stays off), EXIF orientation
is applied, an embedded ICC profile is honoured (converted to sRGB with LittleCMS), and every mode
ends as 8-bit RGB (alpha and palettes composited on white, 16-bit scaled).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageChops, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError

from config.settings import ImagingConfig
from schemas.events import CropBox
from schemas.reasons import Reason
from worker.errors import PermanentError
from worker.imaging.containers import cut_short

__all__ = ["decode_image", "decode_and_crop", "ALLOWED_FORMATS", "accepted_formats", "apply_crop", "srgb_profile"]

log = logging.getLogger(__name__)

_BASE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"})


def _avif_supported() -> bool:
    """Pillow ≥ 11.2 reads AVIF itself when it was built with libavif (the PyPI wheels are)."""
    try:
        from PIL import AvifImagePlugin  # importing it registers the opener in Image.OPEN
    except ImportError:  # Pillow < 11.2
        return False
    return "AVIF" in Image.OPEN and bool(getattr(AvifImagePlugin, "SUPPORTED", False))


#: Formats accepted, as Pillow names them after sniffing the bytes (HEIF is added by
#: :func:`accepted_formats` when ``pillow-heif`` is installed).
ALLOWED_FORMATS = _BASE_FORMATS | ({"AVIF"} if _avif_supported() else frozenset())


@functools.cache
def accepted_formats() -> frozenset[str]:
    """:data:`ALLOWED_FORMATS`, plus ``HEIF`` when the optional ``pillow-heif`` package is importable.

    HEIF/HEIC needs libheif, which Pillow does not ship: ``pip install pillow-heif`` to accept it.
    The opener is registered here, on the first decode, not when this module is imported.
    """
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError:
        return ALLOWED_FORMATS
    try:
        pillow_heif.register_heif_opener()
    except Exception as exc:  # noqa: BLE001 - a broken optional plugin must not stop JPEG decoding
        log.warning("pillow-heif is installed but could not register its opener: %s", exc)
        return ALLOWED_FORMATS
    return ALLOWED_FORMATS | {"HEIF"}


def decode_image(data: bytes, limits: ImagingConfig, *, min_side: int | None = None) -> Image.Image:
    """Decode ``data`` into an 8-bit sRGB image with EXIF orientation applied.

    ``min_side``: the smallest side the caller needs. A JPEG much larger than that is decoded at a
    reduced DCT scale (1/2, 1/4, 1/8) that keeps both sides at least ``min_side`` — several times
    faster, and the model's own resize still does the final, antialiased step.

    Raises:
        PermanentError: ``unsupported_format``, ``decompression_bomb``, ``truncated``, ``corrupt``
            or ``too_small``.
    """
    if not data:
        raise PermanentError(Reason.corrupt, "empty file (0 bytes)")
    formats = accepted_formats()
    with warnings.catch_warnings(), _pillow_limits(limits.max_pixels):
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=sorted(formats))
        except UnidentifiedImageError as exc:
            magic = _magic_format(data)
            if magic in formats:  # an accepted format's signature that Pillow cannot parse
                # Pillow's "cannot identify image file <_io.BytesIO object at 0x…>": a new address each
                # time, so two failures of one file would read differently
                said = f"{magic} file Pillow cannot parse"
                if cut_short(data):
                    raise PermanentError(Reason.truncated, f"{said}, cut short ({len(data)} bytes)") from exc
                raise PermanentError(Reason.corrupt, f"damaged {said}") from exc
            raise PermanentError(
                Reason.unsupported_format,
                f"not an image in an accepted format ({', '.join(sorted(formats))}): {_sniff(data)}",
            ) from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(exc, limits.max_pixels) from exc
        except Exception as exc:  # noqa: BLE001 - any other parse failure is a damaged file
            raise _damaged(exc, data) from exc
        width, height = img.size
        if width * height > limits.max_pixels:
            raise PermanentError(
                Reason.decompression_bomb,
                f"{width}×{height} = {width * height} pixels is over IMGSYNC_MAX_IMAGE_PIXELS={limits.max_pixels}",
            )
        fmt = img.format  # exif_transpose returns an image without .format
        if fmt == "PNG" and img.mode == "RGB" and data[24:25] == b"\x10":  # IHDR bit depth 16
            _key_to_8bit(img)
        try:
            if fmt == "PNG":  # chunk CRCs: Pillow skips them when decoding pixel data
                Image.open(io.BytesIO(data), formats=["PNG"]).verify()
            img.seek(0)  # animated: first frame
            if fmt == "JPEG" and min_side and min(width, height) >= 2 * min_side:
                img.draft(img.mode, (min_side, min_side))
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img, fmt)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(exc, limits.max_pixels) from exc
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes a decoder raise
            raise _damaged(exc, data) from exc
    if min(rgb.size) < limits.min_side:
        raise PermanentError(
            Reason.too_small, f"{rgb.size[0]}×{rgb.size[1]} is under IMGSYNC_MIN_IMAGE_SIDE={limits.min_side}"
        )
    return rgb


#: The most one compressed PNG text or ICC chunk may inflate to. Pillow's own 1 MB refuses real
#: pictures: Photoshop's bloated XMP, ImageMagick's hex "Raw profile" zTXt chunks (twice the
#: profile's size). Pillow's 64 MB cap on all text of one image stays, so memory stays bounded.
PNG_TEXT_CHUNK_MAX = 32 * 2**20


@contextlib.contextmanager
def _pillow_limits(max_pixels: int) -> Iterator[None]:
    """Pillow's global limits set for one decode, then put back.

    - Its bomb guard (``Image.MAX_IMAGE_PIXELS``, which it also applies to TIFF tiles and GIF
      frames) is IMGSYNC_MAX_IMAGE_PIXELS, instead of its default of 89.5 megapixels (179 as a hard
      error), which would refuse images the setting accepts.
    - ``PngImagePlugin.MAX_TEXT_CHUNK`` is at least :data:`PNG_TEXT_CHUNK_MAX`.
    """
    pixels, text = Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_CHUNK
    Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_CHUNK = max_pixels, max(text, PNG_TEXT_CHUNK_MAX)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_CHUNK = pixels, text


def _damaged(exc: Exception, data: bytes) -> PermanentError:
    """``truncated`` when the decoder ran out of data, ``decompression_bomb`` for PNG text chunks
    inflating past :data:`PNG_TEXT_CHUNK_MAX` (or 64 MB together), else ``corrupt``; the message is kept.

    Pillow reports running out of data as an OSError ("image file is truncated", "Truncated File
    Read" for a header segment cut short, "image file is incomplete") and libavif as a SyntaxError
    ("Truncated data"); PNG's verify() reports broken chunks as SyntaxError too. libwebp says only
    that it failed, and a file cut inside its headers fails with any message: a file whose own
    structure declares more bytes than ``data`` holds was cut short (:func:`cut_short`).
    """
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, ValueError) and ("MAX_TEXT_CHUNK" in text or "MAX_TEXT_MEMORY" in text):
        return PermanentError(Reason.decompression_bomb, f"PNG text chunks inflate too far: {text}")
    if isinstance(exc, (OSError, SyntaxError)) and (
        "truncated" in lowered or ("image file is" in lowered and "incomplete" in lowered)
    ):
        return PermanentError(Reason.truncated, text)
    if cut_short(data):
        return PermanentError(Reason.truncated, f"{len(data)} bytes, fewer than its own structure declares: {text}")
    return PermanentError(Reason.corrupt, f"{type(exc).__name__}: {text}")


def _bomb(exc: Exception, max_pixels: int) -> PermanentError:
    """Pillow's guard, in the terms of the setting: Pillow quotes its own limit, which is twice the
    setting past the point where its warning becomes an error ("exceeds limit of 200000000 pixels")."""
    size = re.search(r"\((\d+) pixels\)", str(exc))
    said = f"{size.group(1)} pixels" if size else "the picture"
    return PermanentError(Reason.decompression_bomb, f"{said} is over IMGSYNC_MAX_IMAGE_PIXELS={max_pixels}")


def apply_crop(img: Image.Image, crop: CropBox | None) -> Image.Image:
    """Cut the catalog-supplied crop box (normalized coordinates) out of ``img``."""
    if crop is None:
        return img
    w, h = img.size
    left, top = round(crop.x * w), round(crop.y * h)
    right, bottom = max(left + 1, round((crop.x + crop.w) * w)), max(top + 1, round((crop.y + crop.h) * h))
    return img.crop((left, top, min(right, w), min(bottom, h)))


def decode_and_crop(data: bytes, limits: ImagingConfig, crop: CropBox | None, *, min_side: int | None = None) -> Image.Image:
    """:func:`decode_image`, then the catalog's crop box, else (``IMGSYNC_AUTO_TRIM``) the uniform
    border trimmed: what the model sees of an image, for indexing and for an image query alike."""
    from worker.imaging.trim import trim_border

    img = decode_image(data, limits, min_side=min_side)
    if crop is not None:
        return apply_crop(img, crop)
    if limits.auto_trim:
        return trim_border(img)
    return img


# --- modes and colour -------------------------------------------------------------------------------


def _to_rgb(img: Image.Image, fmt: str | None) -> Image.Image:
    """Any decoded mode → 8-bit sRGB ``RGB``: colour managed when an ICC profile is embedded."""
    icc = img.info.get("icc_profile")
    if img.mode == "CMYK" and fmt in ("JPEG", "MPO") and "adobe" not in img.info:
        # Pillow reads every CMYK JPEG with Adobe's inverted polarity (and writes it that way, with
        # the Adobe APP14 marker). Without that marker the values are stored plain, as browsers
        # and libjpeg's tools read them: undo Pillow's inversion.
        img = ImageChops.invert(img)
    colour, alpha = _split_alpha(_to_8bit(img))
    rgb = _to_srgb(colour, icc) if icc else None
    if rgb is None:
        rgb = _plain_rgb(colour)
    if alpha is None:
        return rgb
    background = Image.new("RGB", rgb.size, (255, 255, 255))
    return Image.composite(rgb, background, alpha)


def _key_to_8bit(img: Image.Image) -> None:
    """A 16-bit RGB PNG's colour key (tRNS) names 16-bit values, but Pillow reads the pixels as 8 bits
    (their high bytes), so the key matched nothing and its pixels stayed opaque: key the high bytes
    too. Pixels within 1/256 of the key colour go transparent with it; at 8 bits they are that colour."""
    key = img.info.get("transparency")
    if isinstance(key, tuple) and len(key) == 3:
        img.info["transparency"] = tuple(int(v) >> 8 for v in key)


def _to_8bit(img: Image.Image) -> Image.Image:
    """High bit depths scaled (not clipped) to 8 bits; palettes expanded; ``1`` as ``L``; a colour
    key (``transparency``) as an alpha channel."""
    mode = img.mode
    key = img.info.get("transparency")  # a colour key: PNG's tRNS on a grey or RGB image
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        if isinstance(key, int):  # the key names a 16-bit value: match it before scaling
            keyed = Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8), "L")
            return Image.merge("LA", (Image.fromarray(arr8, "L"), keyed))
        return Image.fromarray(arr8, "L")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = np.zeros(arr.shape, np.uint8) if hi <= lo else np.rint((arr - lo) * 255.0 / (hi - lo)).astype(np.uint8)
        return Image.fromarray(arr8, "L")
    if mode in ("P", "PA"):
        return img.convert("RGBA")  # the palette's transparency becomes alpha
    if mode in ("1", "L", "RGB") and key is not None:
        # optipng/oxipng store on/off alpha this way: the key colour's pixels are transparent
        return img.convert("RGBA" if mode == "RGB" else "LA")
    if mode == "1":
        return img.convert("L")
    if mode in ("RGBX", "YCbCr"):  # RGB data in another layout: an RGB profile applies after this
        return img.convert("RGB")
    return img


def _split_alpha(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """``(colour, alpha)``; alpha is None when there is none or every pixel is opaque."""
    if img.mode in ("RGBA", "RGBa"):
        img = img.convert("RGBA")  # un-premultiplies RGBa
        colour, alpha = img.convert("RGB"), img.getchannel("A")
    elif img.mode in ("LA", "La"):
        img = img.convert("LA")
        colour, alpha = img.getchannel("L"), img.getchannel("A")
    else:
        return img, None
    if alpha.getextrema() == (255, 255):
        return colour, None
    return colour, alpha


def _plain_rgb(img: Image.Image) -> Image.Image:
    """Without (a usable) profile: the values are taken as sRGB already."""
    if img.mode == "RGB":
        return img
    if img.mode == "LAB":  # CIELab TIFF: LittleCMS knows Lab without any embedded profile
        return ImageCms.profileToProfile(img, _lab(), _srgb(), outputMode="RGB")
    return img.convert("RGB")


#: colour modes LittleCMS converts from (after :func:`_to_8bit` and :func:`_split_alpha`)
_CMS_MODES = frozenset({"RGB", "CMYK", "L", "LAB"})


def _to_srgb(img: Image.Image, icc: bytes) -> Image.Image | None:
    """``img`` converted from its embedded profile to sRGB, or None when the profile is unusable
    (unparsable, or for another colour space than the pixels): the caller then converts plainly."""
    if img.mode not in _CMS_MODES:
        return None
    try:
        transform = _transform(bytes(icc), img.mode)
        if transform is None:  # already sRGB: converting would only add rounding
            return img if img.mode == "RGB" else None
        return ImageCms.applyTransform(img, transform)
    except Exception as exc:  # noqa: BLE001 - a broken profile must not lose the picture
        log.debug("embedded ICC profile ignored (%s: %s); converting without it", type(exc).__name__, exc)
        return None


def srgb_profile(icc: bytes) -> bool:
    """True when ``icc`` is an sRGB profile, i.e. RGB pixels carrying it are used as they are."""
    try:
        return _transform(icc, "RGB") is None
    except Exception:  # noqa: BLE001 - an unparsable profile is not sRGB
        return False


@functools.lru_cache(maxsize=16)
def _transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from profile ``icc`` (pixels in ``mode``) to sRGB; None for an sRGB profile.

    Catalogs use a handful of profiles, so transforms are cached (building one costs milliseconds).
    """
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if mode == "RGB" and _is_srgb(profile):
        return None
    return ImageCms.buildTransform(
        profile, _srgb(), mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL
    )


#: sRGB primaries adapted to D50, as every ICC sRGB profile stores them in rXYZ/gXYZ/bXYZ
_SRGB_COLORANTS = (
    (0.4361, 0.2225, 0.0139),
    (0.3851, 0.7169, 0.0971),
    (0.1431, 0.0606, 0.7141),
)


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    """An sRGB matrix/shaper profile (named sRGB, with sRGB's colorants)."""
    core = profile.profile
    if core.xcolor_space.strip() != "RGB" or not core.is_matrix_shaper:
        return False
    if "srgb" not in (core.profile_description or "").lower():
        return False
    colorants = (core.red_colorant, core.green_colorant, core.blue_colorant)
    if any(c is None for c in colorants):
        return False
    return all(
        abs(got - want) <= 0.003
        for colorant, expected in zip(colorants, _SRGB_COLORANTS, strict=True)
        for got, want in zip(colorant[0], expected, strict=True)
    )


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.cache
def _lab() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))


# --- sniffing ---------------------------------------------------------------------------------------

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)

#: ISO-BMFF ``ftyp`` brands (major or compatible) of AVIF and of HEVC-coded HEIF (HEIC)
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"})
#: brands any HEIF-family file may carry (AVIF is HEIF with AV1 coding)
_HEIF_BRANDS = frozenset({b"mif1", b"msf1"})


def _magic_format(data: bytes) -> str | None:
    """The image format whose signature ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        # ftyp box: size, "ftyp", major brand, minor version, compatible brands
        end = min(len(data), max(16, int.from_bytes(data[:4], "big")), 256)
        brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "AVIF"
        if brands & (_HEIC_BRANDS | _HEIF_BRANDS):
            return "HEIF"
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    return None


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page"
    if head.startswith(b"%!ps") or data[:4] == b"\xc5\xd0\xd3\xc6":
        return "looks like PostScript/EPS"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "looks like XML/SVG"
    magic = _magic_format(data)
    if magic == "HEIF":
        return "looks like HEIF/HEIC (accepted when the pillow-heif package is installed)"
    if magic == "AVIF":
        return "looks like AVIF (this Pillow was built without AVIF support)"
    return f"first bytes {data[:8]!r}"
