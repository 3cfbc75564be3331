"""Fetch from local files, confined to the configured roots; list a local catalog tree."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

from config.settings import FetchConfig
from schemas.events import path_from_uri
from schemas.reasons import Reason
from worker.errors import PermanentError, TransientError

__all__ = ["fetch_local", "walk_tree"]


#: errors that name no file to read until someone changes the tree: not retried
_NEVER_READABLE = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENAMETOOLONG})


def fetch_local(uri: str, cfg: FetchConfig) -> bytes:
    """The bytes of a ``file://`` image.

    Raises:
        PermanentError: ``not_found`` (also a file or folder it may not read, links that loop, a
            name too long), ``forbidden_address`` (outside IMGSYNC_FILE_ROOTS, also via
            a symlink), ``fetch_too_large`` or ``invalid_event`` (a NUL in the name).
        TransientError: an I/O error that may pass.
    """
    path = path_from_uri(uri)
    if "\x00" in str(path):  # a %00 in a uri that skipped normalize_uri: no file is named so
        raise PermanentError(Reason.invalid_event, f"{uri}: a file name cannot hold a NUL character")
    try:
        real = path.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise PermanentError(Reason.not_found, f"no such file: {path}") from exc
    except RuntimeError as exc:  # Python 3.11/3.12: symbolic links that loop (3.13: OSError ELOOP)
        raise PermanentError(Reason.not_found, f"symbolic links loop: {path}") from exc
    except OSError as exc:
        if exc.errno in _NEVER_READABLE:  # as the read below treats a file it may not open
            raise PermanentError(Reason.not_found, f"cannot reach {path}: {exc.strerror}") from exc
        raise TransientError(Reason.fetch_error, f"cannot resolve {path}: {exc}") from exc
    if cfg.file_roots and not any(_inside(real, root) for root in cfg.file_roots):
        raise PermanentError(
            Reason.forbidden_address,
            f"{path} is outside IMGSYNC_FILE_ROOTS ({', '.join(str(r) for r in cfg.file_roots)})",
        )
    if not real.is_file():
        raise PermanentError(Reason.not_found, f"not a regular file: {path}")
    try:
        with real.open("rb") as fh:
            # read(n) allocates n bytes first: ask for the file's size, not the limit (50 MiB), and
            # for the rest up to the limit only if the file grew meanwhile
            size = min(os.fstat(fh.fileno()).st_size, cfg.max_bytes)
            data = fh.read(size + 1)
            if size < len(data) <= cfg.max_bytes:
                data += fh.read(cfg.max_bytes + 1 - len(data))
    except FileNotFoundError as exc:
        raise PermanentError(Reason.not_found, f"no such file: {path}") from exc
    except PermissionError as exc:
        raise PermanentError(Reason.not_found, f"not readable: {path}") from exc
    except OSError as exc:
        raise TransientError(Reason.fetch_error, f"read error on {path}: {exc}") from exc
    if len(data) > cfg.max_bytes:
        raise PermanentError(
            Reason.fetch_too_large, f"{path} is over IMGSYNC_MAX_IMAGE_BYTES={cfg.max_bytes} bytes"
        )
    return data


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def walk_tree(top: Path) -> Iterator[Path]:
    """Every file under ``top``, sorted, skipping hidden files and folders. Symbolically linked
    folders are followed (a catalog may link a SKU's folder in), each real folder once, so a link
    back up the tree ends the walk there instead of looping."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name
