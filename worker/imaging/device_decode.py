"""JPEG decoding on the encode worker's device (nvJPEG on CUDA), for GPU workers whose CPUs cannot
decode as fast as the model encodes (``IMGSYNC_JPEG_DECODE=encoder``).

The preprocess stage reads only a JPEG's header (:func:`plan_handoff`: no pixel is decoded there)
and, when the file is one the device path renders like the CPU path, hands over its bytes and EXIF
orientation instead of pixels. The encode stage decodes its whole batch at once
(:func:`decode_batch`, ``torchvision.io.decode_jpeg`` with a list, on the encoder's device), then
orients, crops or trims, and fits each picture to the model's input on the device, with the same
arithmetic as :mod:`worker.imaging.decode`, :mod:`worker.imaging.trim` and
:mod:`worker.imaging.geometry`. Any picture the device refuses is answered by an exception in its
slot: the caller then runs the CPU path on the same bytes, which records the file's reason code.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from config.settings import ImagingConfig
from schemas.events import CropBox
from worker.imaging import geometry
from worker.imaging import trim as trim_mod

if TYPE_CHECKING:
    import torch

    from worker.encoders.base import PreprocessCfg

__all__ = ["JpegHandoff", "plan_handoff", "decode_batch", "device_geometry_supported", "fit_tensor", "orient_tensor"]

log = logging.getLogger(__name__)

#: interpolation names whose torch resampling equals Pillow's (antialiased bicubic and bilinear
#: use Pillow's kernels). Nearest (float rounding of the source pixel differs at exact halves),
#: lanczos, box and hamming: CPU path only.
_TORCH_MODES = {"bicubic": "bicubic", "random": "bicubic", "bilinear": "bilinear"}

#: EXIF orientation tag
_ORIENTATION = 0x0112


@dataclass(frozen=True)
class JpegHandoff:
    """A JPEG's bytes, checked from its header, for the encode stage to decode on its device."""

    data: bytes
    #: EXIF orientation (1–8), applied after decoding as Pillow's ``exif_transpose`` does
    orientation: int
    width: int
    height: int


def device_geometry_supported(cfg: PreprocessCfg) -> bool:
    """True when :func:`fit_tensor` computes ``cfg``'s model input like the CPU path (imgsync's own
    geometry, RGB, an interpolation torch has with Pillow's arithmetic)."""
    return cfg.geometry == "imgsync" and cfg.mode == "RGB" and cfg.interpolation in _TORCH_MODES


def plan_handoff(data: bytes, limits: ImagingConfig, cfg: PreprocessCfg, *, max_bytes: int) -> JpegHandoff | None:
    """The handoff of ``data`` to the device decoder, or None when the CPU path must decode it.

    Only the header is parsed. Handed over: complete (ends with the EOI marker) 8-bit baseline or
    progressive JPEGs in YCbCr (Photoshop's Adobe marker included) or grayscale, without a colour
    profile other than sRGB, within the size limits, for a model whose geometry the device path
    reproduces. Everything else (CMYK, RGB stored without the YCbCr transform, ICC-managed,
    truncated, multi-picture, 12-bit, too large, too small or very long and thin files, other
    formats) goes the CPU way, which applies colour management and records reason codes.
    """
    if not (0 < len(data) <= max_bytes) or not data.startswith(b"\xff\xd8\xff"):
        return None
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None  # cut short (or a trailer after the picture): Pillow tells which
    if not device_geometry_supported(cfg):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["JPEG"])
            width, height = img.size
            if (
                img.format != "JPEG"  # MPO: a multi-picture file
                or img.mode not in ("RGB", "L")
                or getattr(img, "bits", 8) != 8
                or (img.mode == "RGB" and "adobe" in img.info and img.info.get("adobe_transform") != 1)
                or width * height > limits.max_pixels
                or min(width, height) < limits.min_side
                # a long, thin picture: the device resize would build all of it at the model's scale
                or max(width, height) > geometry.CROP_FIRST_RATIO * min(width, height)
            ):
                return None
            icc = img.info.get("icc_profile")
            if icc and not (img.mode == "RGB" and _is_srgb(bytes(icc))):
                return None
            orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - whatever is wrong with the file, the CPU path names it
        return None
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1  # Pillow's exif_transpose leaves other values alone
    return JpegHandoff(data=data, orientation=orientation, width=width, height=height)


def _is_srgb(icc: bytes) -> bool:
    from worker.imaging.decode import srgb_profile

    return srgb_profile(icc)


def decode_batch(
    items: Sequence[tuple[JpegHandoff, CropBox | None]],
    cfg: PreprocessCfg,
    device: torch.device,
    *,
    auto_trim: bool,
    max_chunk_pixels: int,
) -> list[torch.Tensor | Exception]:
    """Model-input pixels (uint8 3×H×W on ``device``) of each handoff, or the exception that stopped
    it, in order. JPEGs are decoded in chunks of at most ``max_chunk_pixels`` decoded pixels (one
    picture alone may exceed it), each chunk in one call; a chunk the decoder refuses is decoded
    again one picture at a time, so one bad file costs only itself."""
    out: list[torch.Tensor | Exception] = []
    for chunk in _chunks(items, max_chunk_pixels):
        decoded = _decode_chunk([h for h, _ in chunk], device)
        out.extend(_finish(decoded, chunk, cfg, auto_trim=auto_trim))
    return out


def _chunks(
    items: Sequence[tuple[JpegHandoff, CropBox | None]], max_pixels: int
) -> list[list[tuple[JpegHandoff, CropBox | None]]]:
    chunks: list[list[tuple[JpegHandoff, CropBox | None]]] = []
    total = 0
    for item in items:
        pixels = item[0].width * item[0].height
        if chunks and total + pixels <= max_pixels:
            chunks[-1].append(item)
            total += pixels
        else:
            chunks.append([item])
            total = pixels
    return chunks


def _decode_chunk(handoffs: list[JpegHandoff], device: torch.device) -> list[torch.Tensor | Exception]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    blobs = [torch.frombuffer(bytearray(h.data), dtype=torch.uint8) for h in handoffs]
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec (not yet measured here)
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        return [_checked(img, h) for img, h in zip(images, handoffs, strict=True)]
    except Exception as exc:  # noqa: BLE001 - one of them is bad: find which, alone
        if len(handoffs) == 1:
            return [exc]
        log.debug("batched JPEG decode of %d failed (%s): decoding one by one", len(handoffs), exc)
    return [_decode_chunk([h], device)[0] for h in handoffs]


def _checked(img: torch.Tensor, handoff: JpegHandoff) -> torch.Tensor | Exception:
    if tuple(img.shape) != (3, handoff.height, handoff.width):
        return ValueError(f"decoded {tuple(img.shape)}, header says 3×{handoff.height}×{handoff.width}")
    return img


def _finish(
    decoded: list[torch.Tensor | Exception],
    chunk: list[tuple[JpegHandoff, CropBox | None]],
    cfg: PreprocessCfg,
    *,
    auto_trim: bool,
) -> list[torch.Tensor | Exception]:
    """Orientation, then the crop box or the trimmed border, then the model's geometry, for a chunk.
    The trim boxes of the whole chunk are read back from the device at once (one synchronisation per
    chunk, not several per picture)."""
    upright: list[torch.Tensor | Exception] = []
    for img, (handoff, _) in zip(decoded, chunk, strict=True):
        upright.append(img if isinstance(img, Exception) else orient_tensor(img, handoff.orientation))
    to_trim = [i for i, (img, (_, crop)) in enumerate(zip(upright, chunk, strict=True)) if auto_trim and crop is None and not isinstance(img, Exception)]
    boxes = dict(zip(to_trim, _trim_boxes([upright[i] for i in to_trim]), strict=True))  # type: ignore[misc]
    out: list[torch.Tensor | Exception] = []
    for i, (img, (_, crop)) in enumerate(zip(upright, chunk, strict=True)):
        if isinstance(img, Exception):
            out.append(img)
            continue
        try:
            if crop is not None:
                img = crop_tensor(img, crop)
            elif (box := boxes.get(i)) is not None:
                img = img[:, box[1] : box[3], box[0] : box[2]]
            out.append(fit_tensor(img, cfg))
        except Exception as exc:  # noqa: BLE001 - this picture falls back to the CPU path
            out.append(exc)
    return out


# --- orientation, crop, trim ------------------------------------------------------------------------


def orient_tensor(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """A C×H×W picture turned upright as Pillow's ``ImageOps.exif_transpose`` does for ``orientation``."""
    if orientation == 2:  # mirrored
        return img.flip(-1)
    if orientation == 3:  # rotated 180°
        return img.flip(-1, -2)
    if orientation == 4:  # upside-down mirror
        return img.flip(-2)
    if orientation == 5:  # transposed
        return img.transpose(-1, -2)
    if orientation == 6:  # turned 90° clockwise to be upright
        return img.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transversed
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:  # turned 90° counter-clockwise to be upright
        return img.transpose(-1, -2).flip(-2)
    return img


def crop_tensor(img: torch.Tensor, crop: CropBox) -> torch.Tensor:
    """The catalog's crop box cut out of a C×H×W picture (:func:`worker.imaging.decode.apply_crop`)."""
    _, h, w = img.shape
    left, top = round(crop.x * w), round(crop.y * h)
    right, bottom = max(left + 1, round((crop.x + crop.w) * w)), max(top + 1, round((crop.y + crop.h) * h))
    return img[:, top : min(bottom, h), left : min(right, w)]


def _median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """numpy's median (the mean of the two middle values of an even count), not torch's lower one."""
    s = x.sort(dim=dim).values
    n = s.shape[dim]
    lo, hi = s.narrow(dim, (n - 1) // 2, 1), s.narrow(dim, n // 2, 1)
    return ((lo + hi) / 2).squeeze(dim)


def trim_tensor(
    img: torch.Tensor, *, tolerance: int = trim_mod.TOLERANCE, margin: float = trim_mod.MARGIN
) -> torch.Tensor:
    """A uint8 3×H×W picture without its uniform border (:func:`worker.imaging.trim.trim_border`)."""
    (box,) = _trim_boxes([img], tolerance=tolerance, margin=margin)
    return img if box is None else img[:, box[1] : box[3], box[0] : box[2]]


def _trim_boxes(
    images: list[torch.Tensor], *, tolerance: int = trim_mod.TOLERANCE, margin: float = trim_mod.MARGIN
) -> list[tuple[int, int, int, int] | None]:
    """The (left, top, right, bottom) box :func:`worker.imaging.trim.trim_border` cuts out of each
    picture, or None where it leaves the picture whole; one read-back from the device for all."""
    import torch

    probed = [i for i, img in enumerate(images) if min(img.shape[-2:]) >= 2]
    if not probed:
        return [None] * len(images)
    values = torch.stack([_trim_probe(images[i], tolerance) for i in probed]).tolist()
    boxes: list[tuple[int, int, int, int] | None] = [None] * len(images)
    for i, (agree, content, top, bottom, left, right) in zip(probed, values, strict=True):
        if not (agree and content):
            continue  # the corners disagree (no uniform backdrop), or a flat picture
        _, h, w = images[i].shape
        pad = int(round(margin * max(bottom - top, right - left)))
        box = (max(0, left - pad), max(0, top - pad), min(w, right + pad), min(h, bottom + pad))
        boxes[i] = None if box == (0, 0, w, h) else box
    return boxes


def _trim_probe(img: torch.Tensor, tolerance: float) -> torch.Tensor:
    """On the device, without waiting for it: [corners agree, any content, top, bottom, left,
    right] of the content box (pixels with a channel more than ``tolerance`` off the backdrop)."""
    import torch

    _, h, w = img.shape
    k = max(1, int(min(w, h) * trim_mod.PATCH))
    patches = torch.stack((img[:, :k, :k], img[:, :k, w - k :], img[:, h - k :, :k], img[:, h - k :, w - k :]))
    corners = _median(patches.reshape(4, 3, -1).double(), 2)  # 4×3: each corner's median colour
    colour = _median(corners, 0)
    agree = (corners - colour).abs().max() <= tolerance
    tol = max(0, min(255, int(tolerance)))
    backdrop = colour.round().to(torch.int16).view(3, 1, 1)
    content = ((img.to(torch.int16) - backdrop).abs() > tol).any(0)  # H×W
    rows, cols = content.any(1), content.any(0)
    top, left = rows.to(torch.uint8).argmax(), cols.to(torch.uint8).argmax()
    bottom = h - rows.flip(0).to(torch.uint8).argmax()
    right = w - cols.flip(0).to(torch.uint8).argmax()
    return torch.stack([agree.long(), rows.any().long(), top.long(), bottom.long(), left.long(), right.long()])


# --- model geometry ---------------------------------------------------------------------------------


def fit_tensor(img: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    """Resize/crop/pad a uint8 3×H×W picture to ``cfg.size``: :func:`worker.imaging.geometry.apply_geometry`
    on the device, with the same size arithmetic."""
    th, tw = cfg.size
    mode = _TORCH_MODES[cfg.interpolation]
    if cfg.resize_mode == "squash":
        img = _resize(img, (th, tw), mode)
    elif cfg.resize_mode == "longest":
        img = _resize_keep_ratio(img, (th, tw), longest=1.0, mode=mode)
        img = _center_crop_or_pad(img, (th, tw), fill=cfg.fill_color)
    elif cfg.resize_mode == "shortest":
        if cfg.resize_to is not None:
            img = _resize_short_side(img, cfg.resize_to, mode)
        elif th == tw:
            img = _resize_short_side(img, th, mode)
        else:  # open_clip's ResizeKeepRatio, bicubic whatever the configured filter
            img = _resize_keep_ratio(img, (th, tw), longest=0.0, mode="bicubic")
        img = _center_crop_or_pad(img, (th, tw), fill=0)
    else:
        raise ValueError(f"resize_mode {cfg.resize_mode!r} is not one of shortest, longest, squash")
    if tuple(img.shape) != (3, th, tw):  # pragma: no cover - guarded by the arithmetic above
        raise AssertionError(f"geometry produced {tuple(img.shape)}, expected {(3, th, tw)}")
    return img


def _resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Pillow's resize of 8-bit pictures: the horizontal pass first, rounded and clipped to 8 bits,
    then the vertical pass (one float pass would keep the overshoot a sharp edge makes between them)."""
    import torch.nn.functional as F

    h, w = img.shape[-2:]
    if (h, w) == size:
        return img
    x = img[None].float()
    for step in ((h, size[1]), size):
        if tuple(x.shape[-2:]) != step:
            x = F.interpolate(x, size=step, mode=mode, antialias=True, align_corners=False).round_().clamp_(0, 255)
    return x[0].to(img.dtype)


def _resize_short_side(img: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    _, h, w = img.shape
    if min(w, h) == size:
        return img
    new_w, new_h = geometry.short_side_size(w, h, size)
    return _resize(img, (new_h, new_w), mode)


def _resize_keep_ratio(img: torch.Tensor, target: tuple[int, int], *, longest: float, mode: str) -> torch.Tensor:
    _, h, w = img.shape
    new_w, new_h = geometry.keep_ratio_size(w, h, target, longest=longest)
    return _resize(img, (new_h, new_w), mode)


def _center_crop_or_pad(img: torch.Tensor, target: tuple[int, int], *, fill: int) -> torch.Tensor:
    import torch.nn.functional as F

    th, tw = target
    _, h, w = img.shape
    pad = geometry.pad_amounts(w, h, target)
    if pad is not None:
        left, top, right, bottom = pad
        img = F.pad(img, (left, right, top, bottom), value=fill)
        _, h, w = img.shape
        if w == tw and h == th:
            return img
    left, top = geometry.crop_origin(w, h, target)
    return img[:, top : top + th, left : left + tw]
