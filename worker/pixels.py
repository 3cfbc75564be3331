"""The pixel store: model-input pixels handed from preprocess to encode by key, not by value.

Entries are raw uint8 H×W×3 arrays (lossless) with a small header. The embedded store is a
directory; a missing entry (expired, evicted, another machine) makes the encode stage re-run
preprocessing for that image.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from pathlib import Path

import numpy as np

__all__ = ["DirectoryPixelStore", "PixelStore"]

_HEADER = struct.Struct("<4sHHH")  # magic, height, width, channels
_MAGIC = b"IMGP"


class PixelStore:
    """Interface of pixel stores."""

    def put(self, pixels: np.ndarray) -> str:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray | None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError


def _pack(pixels: np.ndarray) -> bytes:
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"pixels must be uint8 H×W×C, got {pixels.dtype} {pixels.shape}")
    h, w, c = pixels.shape
    return _HEADER.pack(_MAGIC, h, w, c) + np.ascontiguousarray(pixels).tobytes()


def _unpack(blob: bytes) -> np.ndarray | None:
    if len(blob) < _HEADER.size:
        return None
    magic, h, w, c = _HEADER.unpack_from(blob)
    body = blob[_HEADER.size :]
    if magic != _MAGIC or len(body) != h * w * c:
        return None
    return np.frombuffer(body, dtype=np.uint8).reshape(h, w, c)


class DirectoryPixelStore(PixelStore):
    """Pixels as files under ``root``; entries older than ``ttl_seconds`` are swept on ``sweep``."""

    #: entries kept at most this long (a stuck encode queue should not fill the disk)
    ttl_seconds = 24 * 3600

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, pixels: np.ndarray) -> str:
        key = uuid.uuid4().hex
        tmp = self.root / f".{key}.tmp"
        tmp.write_bytes(_pack(pixels))
        os.replace(tmp, self.root / key)  # atomic: a reader never sees half an entry
        return key

    def get(self, key: str) -> np.ndarray | None:
        if not key.isalnum():
            return None
        try:
            return _unpack((self.root / key).read_bytes())
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        if key.isalnum():
            (self.root / key).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Remove entries older than the TTL; returns how many."""
        cutoff = time.time() - self.ttl_seconds
        removed = 0
        for entry in self.root.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
