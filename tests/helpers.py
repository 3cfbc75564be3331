"""Helpers shared by tests: deterministic pictures, reference encoders."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic picture with structure (gradients + blocks), not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            (x * (rng.uniform(0.2, 1.5)) + y * rng.uniform(0, 0.5)) % 256,
            (y * rng.uniform(0.2, 1.5)) % 256,
            ((x + y) * rng.uniform(0.1, 0.8)) % 256,
        ],
        axis=-1,
    )
    for _ in range(4):
        x0, y0 = rng.integers(0, max(1, width - 8)), rng.integers(0, max(1, height - 8))
        base[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 256, 3)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    return img.convert(mode) if mode != "RGB" else img


def reference_open_clip(name: str, pretrained: str | None = None, seed: int = 0):
    """open_clip's own path: ``create_model_and_transforms`` + its transform + ``encode_image``.

    Returns ``encode(images) -> L2-normalized float32 vectors``. With ``pretrained=None`` the
    weights are random, seeded like imgsync's random-init models.
    """
    import open_clip
    import torch

    from worker.encoders.tiny import register_tiny_config

    register_tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model.eval()

    def encode(images: list[Image.Image]) -> np.ndarray:
        with torch.no_grad():
            x = torch.stack([transform(img) for img in images])
            v = model.encode_image(x).float().numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return encode


def empty_ledger(url: str):  # type: ignore[no-untyped-def]
    """A ledger at ``url``, migrated and emptied (the PostgreSQL test database is shared by the
    session), with one serving model version ``model-a``."""
    import sqlalchemy as sa

    from worker.ledger import Ledger, make_engine, upgrade

    upgrade(url)
    led = Ledger(make_engine(url))
    if led.engine.dialect.name == "postgresql":
        with led.engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE images, image_vectors, skus, index_versions, workers, dead_letters"))
    led.register_version("model-a", "tiny", "imgsync_images__a", "imgsync_skus__a", 64, serve_if_first=True)
    return led


@contextmanager
def http_server(handler: type) -> Iterator[str]:
    """A real HTTP server (``http.server``, a thread per request) running ``handler`` on a free
    local port: its base URL."""
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
