"""Model-input geometry (resize, crop, pad) on PIL images, the same arithmetic as torchvision and
open_clip's inference transforms, so that vectors match the models' reference code."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from worker.encoders.base import PreprocessCfg

__all__ = ["apply_geometry", "resample_filter"]

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
        if cfg.resize_to is not None:  # timm: resize to size / crop_pct, then centre crop
            img = _resize_short_side(img, cfg.resize_to, flt)
        elif th == tw:
            img = _resize_short_side(img, th, flt)
        else:  # open_clip uses ResizeKeepRatio with its default (bicubic) filter here
            img = _resize_keep_ratio(img, (th, tw), longest=0.0, flt=Image.Resampling.BICUBIC)
        img = _center_crop_or_pad(img, (th, tw), fill=0)
    else:
        raise ValueError(f"resize_mode {cfg.resize_mode!r} is not one of shortest, longest, squash")
    out = np.asarray(img, dtype=np.uint8)
    if out.shape != (th, tw, 3):  # pragma: no cover - guarded by the arithmetic above
        raise AssertionError(f"geometry produced {out.shape}, expected {(th, tw, 3)}")
    return out


def _resize_short_side(img: Image.Image, size: int, flt: Image.Resampling) -> Image.Image:
    # torchvision.transforms.functional._compute_resized_output_size
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), flt)


def _resize_keep_ratio(
    img: Image.Image, target: tuple[int, int], *, longest: float, flt: Image.Resampling
) -> Image.Image:
    # open_clip.transform.ResizeKeepRatio.get_params without the random parts
    w, h = img.size
    ratio_h, ratio_w = h / target[0], w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    new_h, new_w = round(h / ratio), round(w / ratio)
    return img.resize((new_w, new_h), flt)


def _center_crop_or_pad(img: Image.Image, target: tuple[int, int], *, fill: int) -> Image.Image:
    # torchvision center_crop (pads with 0) and open_clip center_crop_or_pad (pads with fill)
    th, tw = target
    w, h = img.size
    if tw > w or th > h:
        left = (tw - w) // 2 if tw > w else 0
        top = (th - h) // 2 if th > h else 0
        right = (tw - w + 1) // 2 if tw > w else 0
        bottom = (th - h + 1) // 2 if th > h else 0
        canvas = Image.new("RGB", (w + left + right, h + top + bottom), (fill, fill, fill))
        canvas.paste(img, (left, top))
        img = canvas
        w, h = img.size
        if w == tw and h == th:
            return img
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))
