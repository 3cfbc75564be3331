"""Preprocessing alone: imgsync's decode (reduced-scale JPEG decoding) + trim + model geometry versus
the plain tutorial path (PIL open + convert('RGB') + the model's transform), on 12-MP JPEG photos.

    python benchmarks/bench_preprocess.py [--images 12] [--model open_clip:ViT-B-32]

Prints images/s of both paths, their ratio, and the cosine between the vectors the two paths give
(the reduced-scale decode must not change what the model sees: cos >= 0.999).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photos(n: int, size: tuple[int, int] = (4000, 3000)) -> list[bytes]:
    """Realistic-ish camera JPEGs: structure, texture, sensor noise, quality 90."""
    from tests.helpers import photo

    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        base = np.asarray(photo(size[0] // 4, size[1] // 4, seed=i).resize(size, Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--model", default="open_clip:ViT-B-32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import open_clip

    from config.settings import ImagingConfig
    from worker.encoders import create_encoder
    from worker.imaging.decode import decode_image
    from worker.imaging.trim import trim_border

    enc = create_encoder(args.model).load()
    _, _, reference_transform = open_clip.create_model_and_transforms(enc.spec.name, pretrained=None)
    geometry_only = reference_transform.transforms[:-3]  # Resize, CenterCrop (before tensor/normalize)
    data = photos(args.images)
    limits = ImagingConfig(max_pixels=200_000_000, min_side=8)
    min_side = 3 * max(enc.preprocess_cfg.size)

    def plain(blob: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(blob)).convert("RGB")
        for t in geometry_only:
            img = t(img)
        return np.asarray(img)

    def ours(blob: bytes) -> np.ndarray:
        img = trim_border(decode_image(blob, limits, min_side=min_side))
        return enc.preprocess([img])[0]

    timings = {"plain": [], "imgsync": []}
    for _ in range(args.rounds):  # interleaved rounds: both paths see the same machine load
        for name, fn in (("plain", plain), ("imgsync", ours)):
            started = time.perf_counter()
            for blob in data:
                fn(blob)
            timings[name].append(len(data) / (time.perf_counter() - started))
    rates = {k: max(v) for k, v in timings.items()}
    va = enc.encode([plain(b) for b in data])
    vb = enc.encode([ours(b) for b in data])
    cos = (va * vb).sum(axis=1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "date": f"{datetime.now(UTC):%Y-%m-%d}", "commit": commit, "images": len(data), "megapixels": 12,
        "plain_images_per_s": round(rates["plain"], 2), "imgsync_images_per_s": round(rates["imgsync"], 2),
        "ratio": round(rates["imgsync"] / rates["plain"], 2),
        "cos_min": round(float(cos.min()), 6), "cos_mean": round(float(cos.mean()), 6), "model": args.model,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
