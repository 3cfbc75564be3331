"""The local weights' digest (part of a model_id) and its cache between processes
(worker/encoders/digest.py), on real files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from worker.encoders.digest import cache_path, file_digest


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def reference(*files: Path) -> str:
    """The digest as model_ids have always named it: sha256 over each file's name and bytes."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def weights(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_digest_of_a_file_and_a_folder_is_unchanged_by_the_cache(tmp_path: Path) -> None:
    """A file's and a folder's digests are what they were before the cache (existing model_ids stay
    valid), computed or read back."""
    f = weights(tmp_path / "m.pt", os.urandom(3 << 20))
    folder = tmp_path / "hf"
    a = weights(folder / "config.json", b'{"a": 1}')
    b = weights(folder / "sub" / "model.safetensors", os.urandom(1 << 20))
    for _ in range(2):
        assert file_digest(f) == reference(f)
        assert file_digest(folder) == reference(a, b)
    assert len(json.loads(cache_path().read_text())) == 2


def test_a_cached_digest_is_used_until_the_file_changes(tmp_path: Path) -> None:
    """The second call takes the remembered digest (here planted, to see that it is read); a content
    change that keeps the size and puts the modification time back is still seen (ctime moved)."""
    f = weights(tmp_path / "m.pt", b"A" * 4096)
    first = file_digest(f)
    entries = json.loads(cache_path().read_text())
    (key,) = entries
    cache_path().write_text(json.dumps({key: "remembered"}))
    assert file_digest(f) == "remembered"

    st = f.stat()
    f.write_bytes(b"B" * 4096)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    changed = file_digest(f)
    assert changed == reference(f) and changed not in (first, "remembered")


def test_a_folder_gaining_a_file_is_hashed_again(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    a = weights(folder / "config.json", b"{}")
    before = file_digest(folder)
    b = weights(folder / "extra.bin", b"x")
    assert file_digest(folder) == reference(a, b) != before


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"k": 3}'])
def test_a_broken_cache_file_is_ignored_and_replaced(tmp_path: Path, content: bytes) -> None:
    f = weights(tmp_path / "m.pt", b"weights")
    weights(cache_path(), content)
    assert file_digest(f) == reference(f)
    assert list(json.loads(cache_path().read_text()).values()) == [reference(f)]


def test_an_unwritable_cache_still_gives_the_digest(tmp_path: Path, cache_home: Path) -> None:
    """A cache location that cannot be written (here a file stands where its folder should be, which
    stops root as well): the digest is computed each time, nothing raised, nothing left behind."""
    f = weights(tmp_path / "m.pt", b"weights")
    weights(cache_home / "imgsync", b"a file, not a folder")
    for _ in range(2):
        assert file_digest(f) == reference(f)
    assert list(cache_home.iterdir()) == [cache_home / "imgsync"]
