"""DirectoryPixelStore: lossless put/get by key, safe keys, validation and TTL sweeping."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from worker.imaging.device_decode import JpegHandoff
from worker.pixels import DirectoryPixelStore


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _age(store: DirectoryPixelStore, key: str, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(store.root / key, (past, past))


def test_put_get_round_trip_is_lossless(tmp_path: Path) -> None:
    """What is put comes back with identical values, dtype uint8 and shape, including 0 and 255."""
    store = DirectoryPixelStore(tmp_path / "px")
    arr = _pixels(37, 53, seed=1)
    arr[0, 0] = (0, 255, 0)
    key = store.put(arr)
    out = store.get(key)
    assert out is not None
    assert out.dtype == np.uint8
    assert out.shape == (37, 53, 3)
    assert np.array_equal(out, arr)


def test_round_trip_of_non_contiguous_view(tmp_path: Path) -> None:
    """A flipped (non-contiguous) view is stored as its logical pixels."""
    store = DirectoryPixelStore(tmp_path / "px")
    arr = _pixels(20, 30, seed=2)[:, ::-1]
    assert not arr.flags["C_CONTIGUOUS"]
    out = store.get(store.put(arr))
    assert out is not None and np.array_equal(out, arr)


def test_keys_are_distinct_and_entries_independent(tmp_path: Path) -> None:
    """Two puts give two keys, each returning its own pixels."""
    store = DirectoryPixelStore(tmp_path / "px")
    a, b = _pixels(8, 8, seed=3), _pixels(9, 7, seed=4)
    ka, kb = store.put(a), store.put(b)
    assert ka != kb
    assert np.array_equal(store.get(ka), a)
    assert np.array_equal(store.get(kb), b)


def test_unknown_key_is_none(tmp_path: Path) -> None:
    """get of a key never put returns None."""
    store = DirectoryPixelStore(tmp_path / "px")
    assert store.get("0123456789abcdef0123456789abcdef") is None


def test_delete_then_get_is_none(tmp_path: Path) -> None:
    """After delete, get returns None and the entry's file is gone; deleting again is harmless."""
    store = DirectoryPixelStore(tmp_path / "px")
    keep = store.put(_pixels(4, 4, seed=5))
    key = store.put(_pixels(4, 4, seed=6))
    store.delete(key)
    assert store.get(key) is None
    assert not (store.root / key).exists()
    store.delete(key)
    assert store.get(keep) is not None


def test_path_like_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    """Keys with path characters read nothing and delete nothing outside the store."""
    store = DirectoryPixelStore(tmp_path / "px")
    victim = tmp_path / "x"
    victim.write_bytes(b"IMGP" + b"\x01\x00\x01\x00\x03\x00" + b"abc")  # even a valid-looking entry
    for key in ("../x", str(victim), "..", "./x", "a/b"):
        assert store.get(key) is None
        store.delete(key)
    assert victim.read_bytes().startswith(b"IMGP")


def test_garbled_entry_reads_as_none(tmp_path: Path) -> None:
    """An entry whose file is not a valid pixel blob reads as missing, not as garbage pixels."""
    store = DirectoryPixelStore(tmp_path / "px")
    key = store.put(_pixels(5, 5, seed=7))
    path = store.root / key
    path.write_bytes(path.read_bytes()[:-1])  # one byte short
    assert store.get(key) is None
    path.write_bytes(b"XXXX" + b"\x00" * 100)
    assert store.get(key) is None


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 3), np.float32),
        np.zeros((4, 4, 3), np.uint16),
        np.zeros((4, 4), np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
    ],
    ids=["float32", "uint16", "2-D", "4-D"],
)
def test_put_refuses_non_uint8_or_wrong_rank(tmp_path: Path, bad: np.ndarray) -> None:
    """put raises ValueError for a non-uint8 or non-3-D array and leaves no entry behind."""
    store = DirectoryPixelStore(tmp_path / "px")
    with pytest.raises(ValueError):
        store.put(bad)
    assert list(store.root.iterdir()) == []


def test_sweep_removes_only_expired_entries(tmp_path: Path) -> None:
    """sweep removes entries older than ttl_seconds, keeps younger ones, and returns the count."""
    store = DirectoryPixelStore(tmp_path / "px")
    store.ttl_seconds = 60
    old1, old2 = store.put(_pixels(3, 3, seed=8)), store.put(_pixels(3, 3, seed=9))
    young = store.put(_pixels(3, 3, seed=10))
    _age(store, old1, 120)
    _age(store, old2, 3600)
    _age(store, young, 30)
    assert store.sweep() == 2
    assert store.get(old1) is None and store.get(old2) is None
    assert store.get(young) is not None
    assert store.sweep() == 0


def test_sweep_with_default_ttl(tmp_path: Path) -> None:
    """With the default TTL (a day), a fresh entry survives and a two-day-old one is swept."""
    store = DirectoryPixelStore(tmp_path / "px")
    fresh, stale = store.put(_pixels(3, 3, seed=11)), store.put(_pixels(3, 3, seed=12))
    _age(store, stale, 2 * 24 * 3600)
    assert store.sweep() == 1
    assert store.get(fresh) is not None
    assert store.get(stale) is None


def test_jpeg_handoff_round_trip(tmp_path: Path) -> None:
    """A JPEG handed to the encode stage comes back as its exact bytes, size and orientation."""
    store = DirectoryPixelStore(tmp_path / "px")
    handoff = JpegHandoff(data=b"\xff\xd8\xff" + bytes(range(256)) * 40 + b"\xff\xd9", orientation=8, width=4000, height=65535)
    assert store.get(store.put(handoff)) == handoff


def test_jpeg_entry_without_bytes_reads_as_missing(tmp_path: Path) -> None:
    """A JPEG entry cut down to its header (a damaged file) is missing, not an empty JPEG."""
    store = DirectoryPixelStore(tmp_path / "px")
    key = store.put(JpegHandoff(data=b"\xff\xd8\xff\xd9", orientation=1, width=10, height=10))
    path = store.root / key
    path.write_bytes(path.read_bytes()[:10])
    assert store.get(key) is None


def test_many_entries_in_order_and_deleted_together(tmp_path: Path) -> None:
    """The directory store answers ``get_many`` in key order (missing and path-like keys as None)
    and ``delete_many`` removes every entry."""
    store = DirectoryPixelStore(tmp_path)
    arrays = [np.full((4, 5, 3), i, dtype=np.uint8) for i in range(3)]
    keys = [store.put(a) for a in arrays]
    got = store.get_many([keys[2], "0" * 32, "../x", keys[0], keys[1]])
    assert got[1] is None and got[2] is None
    assert [int(g[0, 0, 0]) for g in (got[0], got[3], got[4])] == [2, 0, 1]  # type: ignore[index]
    store.delete_many(keys)
    assert store.get_many(keys) == [None, None, None] and not any(tmp_path.iterdir())
