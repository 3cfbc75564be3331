"""``imgsync demo``: a synthetic catalog, indexed end to end on the embedded stack, then a search."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from config.settings import DEFAULT_MODEL, Settings
from worker.encoders.hub import hub_reachable, weights_cached

__all__ = ["make_catalog", "choose_demo_model"]

_SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "ring", "stripes")


def make_catalog(root: Path, n_images: int, n_skus: int, *, seed: int = 7) -> tuple[list[Path], dict[str, Path]]:
    """Write ``n_images`` JPEGs over ``n_skus`` folders ``<root>/<sku>/<n>.jpg``: each SKU is one
    "product" (shape + colours) photographed with jitter. Also returns one unindexed query photo per
    SKU. Photos an earlier, larger run left under ``root`` (and its queries) are removed, so that
    the catalog holds this run's photos only. Returns (catalog files, {sku: query file})."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    queries_dir = root.parent / f"{root.name}-queries"
    queries_dir.mkdir(exist_ok=True)
    products = []
    for i in range(n_skus):
        sku = f"SKU-{i + 1:04d}"
        products.append(
            (
                sku,
                _SHAPES[i % len(_SHAPES)],
                tuple(rng.randrange(30, 226) for _ in range(3)),
                tuple(rng.randrange(30, 226) for _ in range(3)),
            )
        )
    files: list[Path] = []
    for k in range(n_images):
        sku, shape, fg, accent = products[k % n_skus]
        path = root / sku / f"{k // n_skus + 1:02d}.jpg"
        path.parent.mkdir(exist_ok=True)
        _draw(shape, fg, accent, rng).save(path, quality=88)
        files.append(path)
    queries = {}
    for sku, shape, fg, accent in products:
        q = queries_dir / f"{sku}.jpg"
        _draw(shape, fg, accent, rng).save(q, quality=88)
        queries[sku] = q
    _remove_leftovers(root, set(files))
    _remove_leftovers(queries_dir, set(queries.values()))
    return files, queries


def _remove_leftovers(top: Path, keep: set[Path]) -> None:
    """Remove the demo photos under ``top`` that are not in ``keep``, and SKU folders left empty."""
    for path in sorted(top.rglob("*.jpg")):
        if path not in keep and path.is_file():
            path.unlink()
    for folder in sorted((p for p in top.iterdir() if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _draw(shape: str, fg: tuple[int, ...], accent: tuple[int, ...], rng: random.Random) -> Image.Image:
    w, h = rng.choice([(320, 320), (400, 300), (300, 400)])
    bg = tuple(int(v) for v in np.clip(np.array([245, 245, 245]) - rng.randrange(0, 25), 0, 255))
    img = Image.new("RGB", (w, h), bg)  # type: ignore[arg-type]
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.55, 0.8) * min(w, h)
    cx, cy = w / 2 + rng.uniform(-0.08, 0.08) * w, h / 2 + rng.uniform(-0.08, 0.08) * h
    box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
    if shape == "ellipse":
        d.ellipse(box, fill=fg)  # type: ignore[arg-type]
    elif shape == "rectangle":
        d.rectangle(box, fill=fg)  # type: ignore[arg-type]
    elif shape == "triangle":
        d.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fg)  # type: ignore[arg-type]
    elif shape == "diamond":
        d.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=fg)  # type: ignore[arg-type]
    elif shape == "ring":
        d.ellipse(box, outline=fg, width=int(s / 6))  # type: ignore[arg-type]
    else:
        for j in range(5):
            y0 = box[1] + j * s / 5
            d.rectangle((box[0], y0, box[2], y0 + s / 10), fill=fg if j % 2 == 0 else accent)  # type: ignore[arg-type]
    d.ellipse((cx - s / 8, cy - s / 8, cx + s / 8, cy + s / 8), fill=accent)  # type: ignore[arg-type]
    img = img.rotate(rng.uniform(-12, 12), fillcolor=bg, resample=Image.Resampling.BICUBIC)  # type: ignore[arg-type]
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def choose_demo_model(settings: Settings) -> tuple[Settings, str | None]:
    """The settings the demo runs with, and a one-line notice when it had to fall back to ``tiny``."""
    if settings.model != DEFAULT_MODEL:
        return settings, None  # the user chose a model: use it, no fallback
    if weights_cached(settings.model) or hub_reachable():
        return settings, None
    notice = (
        f"The weights of {DEFAULT_MODEL} cannot be downloaded here (the model hub is unreachable and "
        "they are not cached): running the demo with the `tiny` model, RANDOM WEIGHTS, so the search "
        "below shows the plumbing, not search quality. Set IMGSYNC_MODEL to a local checkpoint to use real weights."
    )
    return settings.model_copy(update={"model": "tiny"}), notice
