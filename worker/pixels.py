"""The pixel store: model-input pixels handed from preprocess to encode by key, not by value.

Entries are raw uint8 H×W×3 arrays (lossless) with a small header, or, with
``IMGSYNC_JPEG_DECODE=encoder``, a JPEG's own bytes and orientation for the encode stage to decode on
its device (:class:`~worker.imaging.device_decode.JpegHandoff`). In production the store is Redis
(every entry with a TTL; a Redis with an eviction policy of its own may also drop entries under memory
pressure); the embedded store is a directory. A missing entry (expired, evicted, another machine)
makes the encode stage re-run preprocessing for that image: losing an entry costs time, never an
image.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import uuid
from pathlib import Path

import numpy as np

from schemas.reasons import Reason
from worker.errors import TransientError
from worker.imaging.device_decode import JpegHandoff
from worker.ledger.db import safe_url

log = logging.getLogger(__name__)

__all__ = ["DirectoryPixelStore", "PixelStore", "RedisPixelStore", "open_pixel_store"]

_HEADER = struct.Struct("<4sHHH")  # magic, height, width, channels (a JPEG: its EXIF orientation)
_MAGIC = b"IMGP"
_JPEG_MAGIC = b"IMGJ"

#: what an entry holds: model-input pixels, or a JPEG for the encode stage to decode
Entry = np.ndarray | JpegHandoff


class PixelStore:
    """Interface of pixel stores. ``put`` raises TransientError when the store cannot be written;
    ``get`` answers None for a missing entry; ``delete`` of a missing entry is a no-op."""

    def put(self, pixels: Entry) -> str:
        raise NotImplementedError

    def get(self, key: str) -> Entry | None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def get_many(self, keys: list[str]) -> list[Entry | None]:
        """``get`` of each key, in order (a store with a network answers them in few round trips)."""
        return [self.get(k) for k in keys]

    def delete_many(self, keys: list[str]) -> None:
        """``delete`` of each key."""
        for k in keys:
            self.delete(k)

    def sweep(self) -> int:
        """Remove expired entries (stores without their own expiry); returns how many."""
        return 0


def _pack(pixels: Entry) -> bytes:
    if isinstance(pixels, JpegHandoff):
        return _HEADER.pack(_JPEG_MAGIC, pixels.height, pixels.width, pixels.orientation) + pixels.data
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"pixels must be uint8 H×W×C, got {pixels.dtype} {pixels.shape}")
    h, w, c = pixels.shape
    return _HEADER.pack(_MAGIC, h, w, c) + np.ascontiguousarray(pixels).tobytes()


def _unpack(blob: bytes) -> Entry | None:
    if len(blob) < _HEADER.size:
        return None
    magic, h, w, c = _HEADER.unpack_from(blob)
    body = blob[_HEADER.size :]
    if magic == _JPEG_MAGIC:
        return JpegHandoff(data=body, orientation=c, width=w, height=h) if body else None
    if magic != _MAGIC or len(body) != h * w * c:
        return None
    return np.frombuffer(body, dtype=np.uint8).reshape(h, w, c)


class DirectoryPixelStore(PixelStore):
    """Pixels as files under ``root``; entries older than ``ttl_seconds`` are swept on ``sweep``
    (a stuck encode queue should not fill the disk)."""

    def __init__(self, root: Path, ttl_seconds: int = 24 * 3600) -> None:
        self.root = root
        self.ttl_seconds = ttl_seconds
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, pixels: Entry) -> str:
        key = uuid.uuid4().hex
        tmp = self.root / f".{key}.tmp"
        tmp.write_bytes(_pack(pixels))
        os.replace(tmp, self.root / key)  # atomic: a reader never sees half an entry
        return key

    def get(self, key: str) -> Entry | None:
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


class RedisPixelStore(PixelStore):
    """Pixels as Redis strings ``<prefix><uuid>`` that expire after ``ttl_seconds``."""

    prefix = "imgsync:px:"
    #: keys per MGET / DEL of ``get_many`` / ``delete_many``
    MANY_CHUNK = 64

    def __init__(self, url: str, ttl_seconds: int) -> None:
        import redis

        self.url = url
        self.ttl_seconds = ttl_seconds
        # short timeouts: a dead Redis must turn into a retry, not a worker stuck on a socket
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)

    def put(self, pixels: Entry) -> str:
        key = uuid.uuid4().hex
        blob = _pack(pixels)
        try:
            self.client.set(self.prefix + key, blob, ex=self.ttl_seconds)
        except Exception as exc:  # noqa: BLE001 - redis raises several families (connection, OOM)
            raise TransientError(Reason.internal_error, f"pixel store {safe_url(self.url)}: {exc}") from exc
        return key

    def get(self, key: str) -> Entry | None:
        if not key.isalnum():
            return None
        try:
            blob = self.client.get(self.prefix + key)
        except Exception:  # noqa: BLE001 - unreadable is as good as missing: encode re-preprocesses
            log.warning("pixel store %s unreadable: treating entry %s as missing", safe_url(self.url), key, exc_info=True)
            return None
        return None if blob is None else _unpack(blob)

    def delete(self, key: str) -> None:
        if not key.isalnum():
            return
        try:
            self.client.delete(self.prefix + key)
        except Exception:  # noqa: BLE001 - the TTL removes it anyway
            log.warning("pixel store %s: could not delete %s (it expires by itself)", safe_url(self.url), key)

    def get_many(self, keys: list[str]) -> list[Entry | None]:
        """One MGET per ``MANY_CHUNK`` keys instead of a round trip per key."""
        out: list[Entry | None] = [None] * len(keys)
        valid = [(i, k) for i, k in enumerate(keys) if k.isalnum()]
        for start in range(0, len(valid), self.MANY_CHUNK):
            chunk = valid[start : start + self.MANY_CHUNK]
            try:
                blobs = self.client.mget([self.prefix + k for _, k in chunk])
            except Exception:  # noqa: BLE001 - unreadable is as good as missing: encode re-preprocesses
                log.warning(
                    "pixel store %s unreadable: treating %d entries as missing", safe_url(self.url), len(chunk), exc_info=True
                )
                continue
            for (i, _), blob in zip(chunk, blobs, strict=True):
                out[i] = None if blob is None else _unpack(blob)
        return out

    def delete_many(self, keys: list[str]) -> None:
        """One DEL per ``MANY_CHUNK`` keys."""
        valid = [self.prefix + k for k in keys if k.isalnum()]
        for start in range(0, len(valid), self.MANY_CHUNK):
            chunk = valid[start : start + self.MANY_CHUNK]
            try:
                self.client.delete(*chunk)
            except Exception:  # noqa: BLE001 - the TTL removes them anyway
                log.warning("pixel store %s: could not delete %d entries (they expire)", safe_url(self.url), len(chunk))

    def close(self) -> None:
        self.client.close()


def open_pixel_store(target: str, ttl_seconds: int) -> PixelStore:
    """The store for ``Settings.effective_pixel_store``: Redis for a redis:// URL, else a directory."""
    if target.startswith(("redis://", "rediss://")):
        return RedisPixelStore(target, ttl_seconds)
    return DirectoryPixelStore(Path(target), ttl_seconds)
