"""Auto-trim: cut a uniform border (white, or any flat colour the corners agree on) off a product
photo, keeping a small margin, so the model sees the product rather than the studio backdrop."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["trim_border"]

#: per-channel difference from the border colour still counted as border
TOLERANCE = 12
#: margin kept around the content, as a fraction of the trimmed box's longer side
MARGIN = 0.02


def trim_border(img: Image.Image, *, tolerance: int = TOLERANCE, margin: float = MARGIN) -> Image.Image:
    """``img`` without its uniform border; unchanged when the corners disagree or nothing would be left.

    Transparent borders are already white here (alpha is composited on white when decoding).
    """
    arr = np.asarray(img.convert("RGB"), dtype=np.int16)
    h, w = arr.shape[:2]
    corners = np.stack([arr[0, 0], arr[0, w - 1], arr[h - 1, 0], arr[h - 1, w - 1]])
    if np.abs(corners - corners[0]).max() > tolerance:
        return img  # no uniform backdrop
    content = np.abs(arr - corners[0]).max(axis=2) > tolerance
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return img  # a flat picture: nothing to trim to
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    pad = int(round(margin * max(bottom - top, right - left)))
    box = (max(0, left - pad), max(0, top - pad), min(w, right + pad), min(h, bottom + pad))
    if box == (0, 0, w, h):
        return img
    return img.crop(box)
