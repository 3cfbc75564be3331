"""The same picture stored differently (format, colour mode, EXIF rotation, alpha) decodes to the
same picture, so the model gives it the same vector.

The tiny test model has random weights and tells pictures apart only weakly: a 180° turn or a mirror
image of the picture still scores cosine 0.990–0.998 against it. So "the same vector" is checked at
0.999 (every storage variant scores ≥ 0.9999), well above the 0.98 a trained model would need, and a
control test shows that the usual decoding mistakes fall below that bar.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageChops

from config.settings import ImagingConfig
from tests.helpers import photo
from worker.imaging.decode import decode_image

LIMITS = ImagingConfig(max_pixels=10_000_000, min_side=8)
SAME = 0.999
PICTURE = photo(320, 240, seed=41)

#: EXIF orientation → how the stored pixels are turned so that the tag turns them back upright
_STORED_FOR = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _exif_rotated_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(PICTURE.transpose(_STORED_FOR[orientation]), "JPEG", quality=95, exif=exif.tobytes())


VARIANTS = {
    "exif-rotated-6": lambda: _exif_rotated_jpeg(6),
    "exif-rotated-3": lambda: _exif_rotated_jpeg(3),
    "exif-rotated-8": lambda: _exif_rotated_jpeg(8),
    "cmyk-jpeg": lambda: _save(PICTURE.convert("CMYK"), "JPEG", quality=95),
    "palette-png": lambda: _save(PICTURE.quantize(256), "PNG"),
    "webp": lambda: _save(PICTURE, "WEBP", quality=90),
    "tiff": lambda: _save(PICTURE, "TIFF"),
    "png-alpha-255": lambda: _save(PICTURE.convert("RGBA"), "PNG"),
    "bmp": lambda: _save(PICTURE, "BMP"),
    "avif": lambda: _save(PICTURE, "AVIF", quality=90),
}


def _vectors(encoder, images: list[Image.Image]) -> np.ndarray:
    v = np.asarray(encoder.encode(encoder.preprocess(images)), dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def plain_vector(tiny_encoder) -> np.ndarray:
    """The vector of the plain JPEG (quality 95) of the picture."""
    return _vectors(tiny_encoder, [decode_image(_save(PICTURE, "JPEG", quality=95), LIMITS)])[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_picture_gives_the_same_vector(variant: str, tiny_encoder, plain_vector: np.ndarray) -> None:
    """Each storage variant decodes upright at 320×240 and encodes within cosine 0.999 of the plain JPEG."""
    img = decode_image(VARIANTS[variant](), LIMITS)
    assert img.mode == "RGB" and img.size == PICTURE.size

    cosine = float(_vectors(tiny_encoder, [img])[0] @ plain_vector)

    assert cosine >= SAME, f"{variant}: cosine {cosine:.5f} to the plain JPEG"


@pytest.mark.parametrize(
    "mistake",
    [
        pytest.param(lambda p: p.transpose(Image.Transpose.ROTATE_180), id="orientation-ignored-180"),
        pytest.param(lambda p: p.transpose(Image.Transpose.ROTATE_90).resize(p.size), id="orientation-ignored-90"),
        pytest.param(lambda p: p.transpose(Image.Transpose.FLIP_LEFT_RIGHT), id="mirrored"),
        pytest.param(lambda p: ImageChops.invert(p), id="cmyk-polarity-inverted"),
        pytest.param(lambda p: Image.fromarray(np.asarray(p)[:, :, ::-1].copy()), id="channels-swapped"),
        pytest.param(lambda p: p.convert("L").convert("RGB"), id="colour-lost"),
        pytest.param(lambda p: photo(320, 240, seed=42), id="another-picture"),
    ],
)
def test_decoding_mistakes_fall_below_the_bar(mistake, tiny_encoder, plain_vector: np.ndarray) -> None:
    """The bar is meaningful: a picture decoded wrongly (turned, mirrored, inverted, channels
    swapped, grey) or another picture scores below 0.999 against the plain JPEG."""
    cosine = float(_vectors(tiny_encoder, [mistake(PICTURE)])[0] @ plain_vector)
    assert cosine < SAME, f"cosine {cosine:.5f}"
