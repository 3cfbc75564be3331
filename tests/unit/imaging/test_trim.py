"""trim_border: a uniform backdrop is cut down to the product's box plus a margin; anything else is
left alone."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from config.settings import ImagingConfig
from tests.helpers import photo
from worker.imaging.decode import decode_image
from worker.imaging.trim import MARGIN, TOLERANCE, trim_border

LIMITS = ImagingConfig(max_pixels=100_000_000, min_side=8)


def _product(width: int, height: int, seed: int) -> Image.Image:
    """A product shot: a structured picture with a dark outline (so its edge rows/columns are
    unmistakably not backdrop)."""
    img = photo(width, height, seed=seed)
    ImageDraw.Draw(img).rectangle((0, 0, width - 1, height - 1), outline=(40, 30, 20))
    return img


def _on_backdrop(backdrop: Image.Image, product: Image.Image, at: tuple[int, int]) -> Image.Image:
    canvas = backdrop.copy()
    canvas.paste(product, at)
    return canvas


def _expected_box(
    at: tuple[int, int], size: tuple[int, int], canvas: tuple[int, int], margin: float = MARGIN
) -> tuple[int, int, int, int]:
    (x, y), (w, h) = at, size
    pad = round(margin * max(w, h))
    return (max(0, x - pad), max(0, y - pad), min(canvas[0], x + w + pad), min(canvas[1], y + h + pad))


@pytest.mark.parametrize("margin", [MARGIN, 0.0, 0.1])
def test_white_backdrop_trims_to_product_plus_margin(margin: float) -> None:
    """A product on white is cut to its box plus margin × the box's longer side, pixel for pixel."""
    product = _product(200, 120, seed=1)
    img = _on_backdrop(Image.new("RGB", (640, 480), (255, 255, 255)), product, (150, 210))

    out = trim_border(img, margin=margin)

    box = _expected_box((150, 210), product.size, img.size, margin)
    assert out.size == (box[2] - box[0], box[3] - box[1])
    assert np.array_equal(np.asarray(out), np.asarray(img.crop(box)))


def test_uniform_coloured_backdrop_trims() -> None:
    """A product on a flat non-white backdrop (studio blue) is trimmed the same way."""
    product = _product(90, 150, seed=2)
    img = _on_backdrop(Image.new("RGB", (500, 400), (30, 90, 160)), product, (300, 60))

    out = trim_border(img)

    box = _expected_box((300, 60), product.size, img.size)
    assert np.array_equal(np.asarray(out), np.asarray(img.crop(box)))


def test_noisy_near_white_backdrop_within_tolerance_trims() -> None:
    """A backdrop of near-white noise (238..254 per channel, within the tolerance of its median,
    though corner pixels differ from each other by up to 16) still trims to the product box."""
    rng = np.random.default_rng(3)
    noise = rng.integers(238, 255, size=(400, 600, 3), dtype=np.uint8)
    product = _product(160, 100, seed=3)
    img = _on_backdrop(Image.fromarray(noise, "RGB"), product, (220, 140))
    assert 254 - 238 > TOLERANCE  # single backdrop pixels can disagree by more than the tolerance

    out = trim_border(img)

    box = _expected_box((220, 140), product.size, img.size)
    assert np.array_equal(np.asarray(out), np.asarray(img.crop(box)))


def test_jpeg_product_shot_on_white_trims_close_to_the_product() -> None:
    """A JPEG product shot on white (compression ringing around the edges) trims, without margin,
    to the product box grown by at most one 16-px chroma block per side."""
    product = _product(300, 200, seed=4)
    img = _on_backdrop(Image.new("RGB", (800, 600), (255, 255, 255)), product, (250, 180))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)

    out = trim_border(decode_image(buf.getvalue(), LIMITS), margin=0.0)

    assert 300 <= out.size[0] <= 300 + 2 * 16
    assert 200 <= out.size[1] <= 200 + 2 * 16


def test_disagreeing_corners_leave_the_image_unchanged() -> None:
    """When one corner is not the backdrop colour (a shadow, a scene photo), nothing is trimmed."""
    img = _on_backdrop(Image.new("RGB", (400, 300), (255, 255, 255)), _product(100, 80, seed=5), (150, 110))
    ImageDraw.Draw(img).rectangle((340, 250, 399, 299), fill=(90, 90, 90))  # bottom-right shadow

    assert trim_border(img) is img


def test_photo_without_backdrop_is_unchanged() -> None:
    """A full-frame photo (no uniform border) is returned as it is."""
    img = photo(320, 240, seed=6)
    assert trim_border(img) is img


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (120, 200, 40)])
def test_flat_image_is_unchanged(colour: tuple[int, int, int]) -> None:
    """A completely flat image has no content box: it is returned unchanged, not cropped to nothing."""
    img = Image.new("RGB", (300, 200), colour)
    assert trim_border(img) is img


def test_content_touching_every_edge_is_unchanged() -> None:
    """A product that fills the frame edge to edge (corners still backdrop) leaves nothing to trim."""
    img = Image.new("RGB", (200, 200), (255, 255, 255))
    ImageDraw.Draw(img).polygon([(100, 0), (199, 100), (100, 199), (0, 100)], fill=(200, 0, 0))
    assert trim_border(img) is img


def test_margin_is_clamped_at_the_image_edge() -> None:
    """A product 2 px from the left edge keeps the full left side; the other sides get the margin."""
    product = _product(200, 100, seed=7)
    img = _on_backdrop(Image.new("RGB", (600, 400), (255, 255, 255)), product, (2, 150))

    out = trim_border(img, margin=0.05)

    assert np.array_equal(np.asarray(out), np.asarray(img.crop((0, 140, 212, 260))))


def test_transparent_png_backdrop_trims_after_decoding() -> None:
    """A product on a transparent PNG backdrop (hidden colours behind alpha=0 are noise) is
    composited on white by decode_image, then trimmed to the product box."""
    rng = np.random.default_rng(8)
    rgba = np.concatenate(
        [rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8), np.zeros((300, 400, 1), np.uint8)], axis=2
    )
    img = Image.fromarray(rgba, "RGBA")
    product = _product(120, 90, seed=8)
    img.paste(product.convert("RGBA"), (200, 50))
    buf = io.BytesIO()
    img.save(buf, "PNG")

    out = trim_border(decode_image(buf.getvalue(), LIMITS))

    box = _expected_box((200, 50), product.size, img.size)
    assert out.size == (box[2] - box[0], box[3] - box[1])
    inside = np.asarray(out)[50 - box[1] : 50 - box[1] + 90, 200 - box[0] : 200 - box[0] + 120]
    assert np.array_equal(inside, np.asarray(product))
    assert (np.asarray(out)[0] == 255).all()  # the margin is white, not the hidden colours


def test_non_rgb_input_is_trimmed_in_its_own_mode() -> None:
    """A grayscale image is trimmed too, and keeps its mode."""
    img = _on_backdrop(Image.new("RGB", (300, 300), (255, 255, 255)), _product(100, 100, seed=9), (100, 100))
    gray = img.convert("L")

    out = trim_border(gray)

    assert out.mode == "L"
    assert out.size == (104, 104)


def test_large_image_is_trimmed_quickly() -> None:
    """A 4000×3000 product shot on white is trimmed exactly, in well under 2 s."""
    product = _product(1500, 1100, seed=10)
    img = _on_backdrop(Image.new("RGB", (4000, 3000), (255, 255, 255)), product, (1200, 900))
    trim_border(img)  # warm up

    start = time.perf_counter()
    out = trim_border(img)
    elapsed = time.perf_counter() - start

    box = _expected_box((1200, 900), product.size, img.size)
    assert out.size == (box[2] - box[0], box[3] - box[1])
    assert elapsed < 2.0, f"trim_border took {elapsed:.2f} s on 4000×3000"
