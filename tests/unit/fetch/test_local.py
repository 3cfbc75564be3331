"""fetch_local: the bytes of a file:// image, confined to IMGSYNC_FILE_ROOTS and IMGSYNC_MAX_IMAGE_BYTES."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.settings import FetchConfig
from schemas.events import normalize_uri
from schemas.reasons import Reason
from worker.errors import PermanentError
from worker.fetch.local import fetch_local

PAYLOAD = bytes(range(256)) * 4  # 1024 bytes, every byte value


def _cfg(*roots: Path, max_bytes: int = 1 << 20) -> FetchConfig:
    return FetchConfig(max_bytes=max_bytes, file_roots=tuple(r.resolve() for r in roots))


def _reason(uri: str, cfg: FetchConfig) -> Reason:
    with pytest.raises(PermanentError) as info:
        fetch_local(uri, cfg)
    return info.value.reason


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """tmp_path with symlinks resolved, so roots and files compare as real paths."""
    return tmp_path.resolve()


def test_reads_the_file_bytes(base: Path) -> None:
    """The bytes of an existing file come back unchanged."""
    f = base / "a b" / "img+1.jpg"
    f.parent.mkdir()
    f.write_bytes(PAYLOAD)
    assert fetch_local(normalize_uri(str(f)), _cfg()) == PAYLOAD


def test_a_file_name_that_is_not_utf8_is_read(base: Path) -> None:
    """A file name in another encoding (bytes Linux allows) keeps its bytes through its uri: the file
    itself is read, not a look-alike with U+FFFD that does not exist."""
    f = base / os.fsdecode(b"caf\xe9 \xff.jpg")
    f.write_bytes(PAYLOAD)
    uri = normalize_uri(str(f))
    assert uri.isascii() and uri.endswith("/caf%E9%20%FF.jpg")
    assert fetch_local(uri, _cfg(base)) == PAYLOAD


def test_missing_file_is_not_found(base: Path) -> None:
    """A path that does not exist is refused as not_found."""
    assert _reason(normalize_uri(str(base / "nope.jpg")), _cfg()) == Reason.not_found


def test_missing_parent_is_not_found(base: Path) -> None:
    """A path under a regular file (not a directory) is refused as not_found."""
    (base / "file").write_bytes(b"x")
    assert _reason((base / "file" / "child.jpg").as_uri(), _cfg()) == Reason.not_found


def test_links_that_loop_and_names_too_long_are_not_found(base: Path) -> None:
    """Symbolic links that loop (Python 3.11 raises RuntimeError: it escaped untyped and was retried
    until retries_exhausted) and a name longer than the file system allows are not_found for good."""
    os.symlink(base / "b.jpg", base / "a.jpg")
    os.symlink(base / "a.jpg", base / "b.jpg")
    assert _reason(normalize_uri(str(base / "a.jpg")), _cfg()) == Reason.not_found
    assert _reason(normalize_uri(str(base / ("x" * 300 + ".jpg"))), _cfg()) == Reason.not_found


def test_a_nul_in_a_file_uri_is_refused(base: Path) -> None:
    """%00 decodes to a NUL no file name holds: normalize_uri refuses it (it was accepted: its
    check ran before decoding), and a uri that skipped it is an invalid_event, not a ValueError."""
    with pytest.raises(ValueError, match="NUL"):
        normalize_uri(f"file://{base}/a%00b.jpg")
    assert _reason(f"file://{base}/a%00b.jpg", _cfg()) == Reason.invalid_event


def test_directory_is_not_found(base: Path) -> None:
    """A directory is not an image file: not_found."""
    (base / "dir.jpg").mkdir()
    assert _reason(normalize_uri(str(base / "dir.jpg")), _cfg()) == Reason.not_found


def test_size_limit(base: Path) -> None:
    """A file of exactly max_bytes is read; one byte more is refused as fetch_too_large."""
    exact, over = base / "exact.bin", base / "over.bin"
    exact.write_bytes(PAYLOAD)
    over.write_bytes(PAYLOAD + b"!")
    cfg = _cfg(max_bytes=len(PAYLOAD))
    assert fetch_local(normalize_uri(str(exact)), cfg) == PAYLOAD
    assert _reason(normalize_uri(str(over)), cfg) == Reason.fetch_too_large


@pytest.mark.parametrize("reported", [0, 100])
def test_a_file_larger_than_its_size_said_is_read_whole_up_to_the_limit(
    base: Path, monkeypatch: pytest.MonkeyPatch, reported: int
) -> None:
    """The read asks for the size fstat reports; a file that grew after it (or reports 0, as
    procfs and some FUSE mounts do) is still read whole, and refused once past max_bytes."""
    import worker.fetch.local as local

    real_fstat = os.fstat
    monkeypatch.setattr(local.os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], reported, *real_fstat(fd)[7:])))
    path = base / "grown.bin"
    path.write_bytes(PAYLOAD)
    assert fetch_local(normalize_uri(str(path)), _cfg(max_bytes=len(PAYLOAD))) == PAYLOAD
    assert _reason(normalize_uri(str(path)), _cfg(max_bytes=len(PAYLOAD) - 1)) == Reason.fetch_too_large


def test_file_inside_root_is_allowed(base: Path) -> None:
    """With file_roots set, a file in a sub-folder of a root is read."""
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(PAYLOAD)
    other = base / "other"
    other.mkdir()
    assert fetch_local(normalize_uri(str(root / "sub" / "a.jpg")), _cfg(other, root)) == PAYLOAD


def test_file_outside_roots_is_forbidden(base: Path) -> None:
    """With file_roots set, an existing file outside every root is refused as forbidden_address."""
    root = base / "root"
    root.mkdir()
    outside = base / "outside.jpg"
    outside.write_bytes(PAYLOAD)
    assert _reason(normalize_uri(str(outside)), _cfg(root)) == Reason.forbidden_address


def test_sibling_with_root_name_prefix_is_forbidden(base: Path) -> None:
    """A folder whose name merely starts with the root's name ("root2" vs "root") is outside it."""
    root, sibling = base / "root", base / "root2"
    root.mkdir()
    sibling.mkdir()
    (sibling / "a.jpg").write_bytes(PAYLOAD)
    assert _reason(normalize_uri(str(sibling / "a.jpg")), _cfg(root)) == Reason.forbidden_address


def test_symlink_escaping_root_is_forbidden(base: Path) -> None:
    """A symlink inside the root that points outside it is refused as forbidden_address."""
    root = base / "root"
    root.mkdir()
    secret = base / "secret.jpg"
    secret.write_bytes(PAYLOAD)
    link = root / "innocent.jpg"
    os.symlink(secret, link)
    assert link.read_bytes() == PAYLOAD  # the link itself works
    assert _reason(link.as_uri(), _cfg(root)) == Reason.forbidden_address


def test_symlinked_directory_escaping_root_is_forbidden(base: Path) -> None:
    """A symlinked folder inside the root that points outside it does not widen the root."""
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "a.jpg").write_bytes(PAYLOAD)
    os.symlink(outside, root / "door")
    assert _reason((root / "door" / "a.jpg").as_uri(), _cfg(root)) == Reason.forbidden_address


def test_symlink_within_root_is_allowed(base: Path) -> None:
    """A symlink inside the root pointing to another file inside the root is read."""
    root = base / "root"
    root.mkdir()
    (root / "real.jpg").write_bytes(PAYLOAD)
    os.symlink(root / "real.jpg", root / "alias.jpg")
    assert fetch_local((root / "alias.jpg").as_uri(), _cfg(root)) == PAYLOAD


@pytest.mark.parametrize("normalized", [False, True], ids=["raw-uri", "normalized-uri"])
def test_dotdot_escaping_root_is_forbidden(base: Path, normalized: bool) -> None:
    """A path with `..` that climbs out of the root is refused as forbidden_address."""
    root = base / "root"
    root.mkdir()
    (base / "secret.jpg").write_bytes(PAYLOAD)
    sneaky = f"{root}/../secret.jpg"
    uri = normalize_uri(sneaky) if normalized else "file://" + sneaky
    assert ".." in uri or normalized
    assert _reason(uri, _cfg(root)) == Reason.forbidden_address


def test_dotdot_staying_inside_root_is_allowed(base: Path) -> None:
    """A `..` that stays inside the root is fine."""
    root = base / "root"
    (root / "a").mkdir(parents=True)
    (root / "b.jpg").write_bytes(PAYLOAD)
    assert fetch_local(f"file://{root}/a/../b.jpg", _cfg(root)) == PAYLOAD


def test_empty_roots_allow_any_path(base: Path) -> None:
    """With no file_roots, any local path can be read, symlinks included."""
    (base / "x").mkdir()
    (base / "x" / "a.jpg").write_bytes(PAYLOAD)
    os.symlink(base / "x" / "a.jpg", base / "link.jpg")
    cfg = _cfg()
    assert cfg.file_roots == ()
    assert fetch_local(normalize_uri(str(base / "x" / "a.jpg")), cfg) == PAYLOAD
    assert fetch_local(normalize_uri(str(base / "link.jpg")), cfg) == PAYLOAD
    assert fetch_local(f"file://{base}/x/../x/a.jpg", cfg) == PAYLOAD
