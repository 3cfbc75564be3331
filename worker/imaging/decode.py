"""Bytes → a normalized RGB picture, or a typed rejection with a reason code.

Formats are decided from the bytes (an allowlist), decompression bombs are refused before pixels
are decoded, truncated files are refused (``LOAD_TRUNCATED_IMAGES`` stays off), EXIF orientation
is applied, and every mode ends as 8-bit RGB (alpha and palettes composited on white, 16-bit scaled).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from config.settings import ImagingConfig
from schemas.events import CropBox
from schemas.reasons import Reason
from worker.errors import PermanentError

__all__ = ["decode_image", "ALLOWED_FORMATS", "apply_crop"]

#: Formats accepted, as Pillow names them after sniffing the bytes.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"})


def decode_image(data: bytes, limits: ImagingConfig) -> Image.Image:
    """Decode ``data`` into an 8-bit RGB image with EXIF orientation applied.

    Raises:
        PermanentError: ``unsupported_format``, ``decompression_bomb``, ``truncated``, ``corrupt``
            or ``too_small``.
    """
    if not data:
        raise PermanentError(Reason.corrupt, "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
        except UnidentifiedImageError as exc:
            if _magic_format(data):  # an accepted format's signature that Pillow cannot parse
                raise PermanentError(Reason.corrupt, f"damaged {_magic_format(data)} file: {exc}") from exc
            raise PermanentError(
                Reason.unsupported_format,
                f"not an image in an accepted format ({', '.join(sorted(ALLOWED_FORMATS))}): {_sniff(data)}",
            ) from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PermanentError(Reason.decompression_bomb, str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - any other parse failure is a corrupt file
            raise PermanentError(Reason.corrupt, f"{type(exc).__name__}: {exc}") from exc
        width, height = img.size
        if width * height > limits.max_pixels:
            raise PermanentError(
                Reason.decompression_bomb,
                f"{width}×{height} = {width * height} pixels is over IMGSYNC_MAX_IMAGE_PIXELS={limits.max_pixels}",
            )
        try:
            if img.format == "PNG":  # chunk CRCs: Pillow skips them when decoding pixel data
                Image.open(io.BytesIO(data), formats=["PNG"]).verify()
            img.seek(0)  # animated: first frame
            img.load()
            img = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PermanentError(Reason.decompression_bomb, str(exc)) from exc
        except SyntaxError as exc:  # Pillow's PNG verify() reports broken chunks this way
            raise PermanentError(Reason.corrupt, f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            text = str(exc)
            if "truncated" in text or "image file is" in text.lower() and "incomplete" in text.lower():
                raise PermanentError(Reason.truncated, text) from exc
            raise PermanentError(Reason.corrupt, f"{type(exc).__name__}: {text}") from exc
        except Exception as exc:  # noqa: BLE001
            raise PermanentError(Reason.corrupt, f"{type(exc).__name__}: {exc}") from exc
    rgb = _to_rgb(img)
    if min(rgb.size) < limits.min_side:
        raise PermanentError(
            Reason.too_small, f"{rgb.size[0]}×{rgb.size[1]} is under IMGSYNC_MIN_IMAGE_SIDE={limits.min_side}"
        )
    return rgb


def apply_crop(img: Image.Image, crop: CropBox | None) -> Image.Image:
    """Cut the catalog-supplied crop box (normalized coordinates) out of ``img``."""
    if crop is None:
        return img
    w, h = img.size
    left, top = round(crop.x * w), round(crop.y * h)
    right, bottom = max(left + 1, round((crop.x + crop.w) * w)), max(top + 1, round((crop.y + crop.h) * h))
    return img.crop((left, top, min(right, w), min(bottom, h)))


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = np.zeros(arr.shape, np.uint8) if hi <= lo else np.rint((arr - lo) * 255.0 / (hi - lo)).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def _magic_format(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
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
    return f"first bytes {data[:8]!r}"
