"""Model-input geometry (resize, crop, pad) on PIL images, the same arithmetic as torchvision and
open_clip's inference transforms, so that vectors match the models' reference code."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from worker.encoders.base import PreprocessCfg

__all__ = ["apply_geometry", "resample_filter", "short_side_size", "keep_ratio_size", "pad_amounts", "crop_origin"]

#: resize only the centre-cropped part (see :func:`_resize_for_crop`) when the full resize would
#: be over this many times the model input's area; below it, resize then crop exactly as the
#: reference code does
CROP_FIRST_RATIO = 64

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resample_filter(name: str) -> Image.Resampling:
    """The PIL filter for an interpolation name (``random`` means bicubic at inference)."""
    if name == "random":
        name = "bicubic"
    try:
        return _FILTERS[name]
    except KeyError:
        raise ValueError(f"interpolation {name!r} is not one of {', '.join(sorted(_FILTERS))}") from None


def apply_geometry(img: Image.Image, cfg: PreprocessCfg) -> np.ndarray:
    """Resize/crop/pad an RGB image to ``cfg.size``; returns uint8 H×W×3."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    th, tw = cfg.size
    flt = resample_filter(cfg.interpolation)
    if cfg.resize_mode == "squash":
        img = img.resize((tw, th), flt)
    elif cfg.resize_mode == "longest":
        img = _resize_keep_ratio(img, (th, tw), longest=1.0, flt=flt)
        img = _center_crop_or_pad(img, (th, tw), fill=cfg.fill_color)
    elif cfg.resize_mode == "shortest":
        w, h = img.size
        if cfg.resize_to is not None:  # timm: resize to size / crop_pct, then centre crop
            img = _resize_for_crop(img, short_side_size(w, h, cfg.resize_to), (th, tw), flt)
        elif th == tw:
            img = _resize_for_crop(img, short_side_size(w, h, th), (th, tw), flt)
        else:  # open_clip uses ResizeKeepRatio with its default (bicubic) filter here
            size = keep_ratio_size(w, h, (th, tw), longest=0.0)
            img = _resize_for_crop(img, size, (th, tw), Image.Resampling.BICUBIC)
        img = _center_crop_or_pad(img, (th, tw), fill=0)
    else:
        raise ValueError(f"resize_mode {cfg.resize_mode!r} is not one of shortest, longest, squash")
    out = np.asarray(img, dtype=np.uint8)
    if out.shape != (th, tw, 3):  # pragma: no cover - guarded by the arithmetic above
        raise AssertionError(f"geometry produced {out.shape}, expected {(th, tw, 3)}")
    return out


def short_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side resized to ``size`` (torchvision's
    ``_compute_resized_output_size``)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def keep_ratio_size(w: int, h: int, target: tuple[int, int], *, longest: float) -> tuple[int, int]:
    """(width, height) of open_clip's ``ResizeKeepRatio`` (without its random parts) for ``target``
    (height, width)."""
    ratio_h, ratio_w = h / target[0], w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(w / ratio), round(h / ratio)


def pad_amounts(w: int, h: int, target: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) padding of a centre crop-or-pad to ``target`` (height, width), or
    None when no side is short (torchvision's center_crop, open_clip's center_crop_or_pad)."""
    th, tw = target
    if tw <= w and th <= h:
        return None
    left = (tw - w) // 2 if tw > w else 0
    top = (th - h) // 2 if th > h else 0
    right = (tw - w + 1) // 2 if tw > w else 0
    bottom = (th - h + 1) // 2 if th > h else 0
    return left, top, right, bottom


def crop_origin(w: int, h: int, target: tuple[int, int]) -> tuple[int, int]:
    """(left, top) of a centre crop to ``target`` (height, width)."""
    return int(round((w - target[1]) / 2.0)), int(round((h - target[0]) / 2.0))


def _resize_for_crop(
    img: Image.Image, size: tuple[int, int], target: tuple[int, int], flt: Image.Resampling
) -> Image.Image:
    """``img`` resized to ``size`` (width, height) ahead of a centre crop to ``target`` (height, width).

    When the resized picture would be over :data:`CROP_FIRST_RATIO` times the target's area (a long,
    thin picture: an 8×100000 strip, a few kilobytes of PNG, would become 224×2.8 million pixels),
    only the part the crop keeps is resized (Pillow's ``box``: the same filter and scale; pixels may
    differ from the reference's by rounding and by Pillow's choice of which axis it resamples first),
    so time and memory stay bounded by the model input.
    """
    if size == img.size:
        return img
    new_w, new_h = size
    th, tw = target
    if new_w * new_h <= CROP_FIRST_RATIO * tw * th:
        return img.resize(size, flt)
    w, h = img.size
    left, top = crop_origin(new_w, new_h, target)
    left, top = max(0, left), max(0, top)  # an axis shorter than the target is padded, not cropped
    out_w, out_h = min(new_w, tw), min(new_h, th)
    box = (left * w / new_w, top * h / new_h, (left + out_w) * w / new_w, (top + out_h) * h / new_h)
    return img.resize((out_w, out_h), flt, box=box)


def _resize_keep_ratio(
    img: Image.Image, target: tuple[int, int], *, longest: float, flt: Image.Resampling
) -> Image.Image:
    return img.resize(keep_ratio_size(*img.size, target, longest=longest), flt)


def _center_crop_or_pad(img: Image.Image, target: tuple[int, int], *, fill: int) -> Image.Image:
    th, tw = target
    w, h = img.size
    pad = pad_amounts(w, h, target)
    if pad is not None:
        left, top, right, bottom = pad
        canvas = Image.new("RGB", (w + left + right, h + top + bottom), (fill, fill, fill))
        canvas.paste(img, (left, top))
        img = canvas
        w, h = img.size
        if w == tw and h == th:
            return img
    left, top = crop_origin(w, h, target)
    return img.crop((left, top, left + tw, top + th))
