"""apply_geometry: pixel-identical to open_clip's own inference transform (minus ToTensor/Normalize)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import photo
from worker.encoders.base import PreprocessCfg
from worker.imaging.geometry import apply_geometry

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _cfg(
    size: tuple[int, int],
    *,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    fill_color: int = 0,
) -> PreprocessCfg:
    return PreprocessCfg(
        size=size,
        mean=MEAN,
        std=STD,
        interpolation=interpolation,
        resize_mode=resize_mode,
        fill_color=fill_color,
    )


def _reference(img: Image.Image, cfg: PreprocessCfg) -> np.ndarray:
    """open_clip's inference transform without its last two steps (ToTensor, Normalize)."""
    from open_clip.transform import image_transform

    h, w = cfg.size
    image_size: int | tuple[int, int] = h if h == w else (h, w)
    compose = image_transform(
        image_size,
        is_train=False,
        mean=cfg.mean,
        std=cfg.std,
        resize_mode=cfg.resize_mode,
        interpolation=cfg.interpolation,
        fill_color=cfg.fill_color,
    )
    steps = compose.transforms
    assert type(steps[-1]).__name__ == "Normalize"
    assert "ToTensor" in type(steps[-2]).__name__
    for step in steps[:-2]:
        img = step(img)
    return np.asarray(img)


def _assert_matches_open_clip(img: Image.Image, cfg: PreprocessCfg) -> np.ndarray:
    ours = apply_geometry(img, cfg)
    ref = _reference(img, cfg)
    assert ours.dtype == np.uint8
    assert ours.shape == (cfg.size[0], cfg.size[1], 3)
    assert ref.shape == ours.shape
    assert np.array_equal(ours, ref)
    return ours


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("width", "height", "seed"),
    [
        (300, 200, 1),  # landscape
        (180, 310, 2),  # portrait
        (20, 13, 3),  # tiny: smaller than the target, upscaled
        (64, 64, 4),  # already the exact size
        (64, 97, 5),  # short side already the target, long side cropped
        (255, 129, 6),  # odd sizes
        (71, 64, 8),  # crop offset 3.5: round-half-even picks 4, floor would pick 3
        (200, 134, 9),  # resized to 95×64, crop offset 15.5 → 16
    ],
)
def test_shortest_square_matches_open_clip(width: int, height: int, seed: int, interpolation: str) -> None:
    """Square target, shortest mode: resize short side + centre crop equals open_clip pixel for pixel."""
    _assert_matches_open_clip(photo(width, height, seed), _cfg((64, 64), interpolation=interpolation))


def test_exact_size_image_is_unchanged() -> None:
    """An image already at the square target size comes back with identical pixels."""
    img = photo(64, 64, 7)
    out = _assert_matches_open_clip(img, _cfg((64, 64)))
    assert np.array_equal(out, np.asarray(img))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("width", "height", "seed"),
    [(300, 200, 11), (150, 260, 12), (20, 13, 13), (96, 64, 14), (97, 65, 15), (103, 64, 16)],
)
def test_shortest_non_square_matches_open_clip(width: int, height: int, seed: int, interpolation: str) -> None:
    """Non-square (64, 96) target, shortest mode: open_clip's ResizeKeepRatio + centre crop, exactly."""
    _assert_matches_open_clip(photo(width, height, seed), _cfg((64, 96), interpolation=interpolation))


@pytest.mark.parametrize("fill_color", [0, 255])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("width", "height", "seed", "size"),
    [
        (300, 200, 21, (64, 64)),  # landscape: pad top/bottom
        (170, 301, 22, (64, 64)),  # portrait: pad left/right
        (20, 13, 23, (64, 64)),  # tiny, upscaled then padded
        (301, 100, 24, (64, 96)),  # non-square target
    ],
)
def test_longest_pads_like_open_clip(
    width: int, height: int, seed: int, size: tuple[int, int], interpolation: str, fill_color: int
) -> None:
    """Longest mode: resize long side + pad with fill_color, exactly as open_clip's CenterCropOrPad."""
    cfg = _cfg(size, interpolation=interpolation, resize_mode="longest", fill_color=fill_color)
    _assert_matches_open_clip(photo(width, height, seed), cfg)


@pytest.mark.parametrize("fill_color", [0, 255])
def test_longest_padding_uses_fill_color(fill_color: int) -> None:
    """The padded band of a wide image in longest mode has exactly the fill colour."""
    out = apply_geometry(photo(300, 100, 31), _cfg((60, 60), resize_mode="longest", fill_color=fill_color))
    # 300x100 -> 60x20, padded by 20 rows above and below
    assert (out[:20] == fill_color).all()
    assert (out[-20:] == fill_color).all()
    assert not (out[20:40] == fill_color).all()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(("width", "height", "size"), [(300, 200, (64, 64)), (20, 13, (64, 96)), (90, 300, (64, 96))])
def test_squash_matches_open_clip(width: int, height: int, size: tuple[int, int], interpolation: str) -> None:
    """Squash mode: a plain resize to (h, w) ignoring the aspect ratio, as in open_clip."""
    cfg = _cfg(size, interpolation=interpolation, resize_mode="squash")
    _assert_matches_open_clip(photo(width, height, 41), cfg)


def test_bilinear_and_bicubic_differ() -> None:
    """The interpolation setting is honoured: bilinear and bicubic give different pixels."""
    img = photo(300, 200, 51)
    a = apply_geometry(img, _cfg((64, 64), interpolation="bilinear"))
    b = apply_geometry(img, _cfg((64, 64), interpolation="bicubic"))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_non_rgb_input_is_converted_to_rgb_first(mode: str) -> None:
    """L and RGBA inputs give the same pixels as their RGB conversion, shaped H×W×3."""
    img = photo(120, 90, 61, mode=mode)
    if mode == "RGBA":  # make alpha non-trivial: conversion to RGB must drop it, not blend it
        alpha = Image.fromarray(np.tile(np.arange(120, dtype=np.uint8) * 2, (90, 1)), "L")
        img.putalpha(alpha)
    cfg = _cfg((48, 48))
    out = apply_geometry(img, cfg)
    assert out.shape == (48, 48, 3)
    assert out.dtype == np.uint8
    assert np.array_equal(out, apply_geometry(img.convert("RGB"), cfg))
    if mode == "L":
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_unknown_resize_mode_raises() -> None:
    """A resize_mode other than shortest/longest/squash raises ValueError naming it."""
    with pytest.raises(ValueError, match="stretch"):
        apply_geometry(photo(50, 40, 71), _cfg((32, 32), resize_mode="stretch"))
