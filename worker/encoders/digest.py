"""The digest of local weights (part of a ``model_id``), remembered between processes.

Hashing a checkpoint reads all of it: seconds for a large model, on every worker start and every
``imgsync search``. A digest is therefore kept in ``$XDG_CACHE_HOME/imgsync/weights-digests.json``
(default ``~/.cache``), keyed by every file's path, device, inode, size, modification time and
status-change time (``ctime``). Any write to a file changes its ``ctime``, which no tool can set back,
so a file whose content changed never matches its old entry, even when its size and ``mtime`` were
restored. A cache that cannot be read or written is ignored: the digest is then computed each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

__all__ = ["file_digest", "cache_path"]

log = logging.getLogger(__name__)

#: entries kept in the cache file (the oldest are dropped first)
MAX_ENTRIES = 256

_lock = threading.Lock()


def cache_path() -> Path:
    """Where digests are remembered."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imgsync" / "weights-digests.json"


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Short sha256 of a weights file or of every file in a weights folder (names and contents, in
    sorted path order), from the cache when no file changed since it was computed."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = json.dumps([_stamp(f) for f in files])
    with _lock:
        known = _load()
        if key in known:
            return known[key]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    digest = h.hexdigest()[:16]
    if key == json.dumps([_stamp(f) for f in files]):  # nothing was written while it was read
        with _lock:
            known = _load()
            known.pop(key, None)
            known[key] = digest
            _store(dict(list(known.items())[-MAX_ENTRIES:]))
    return digest


def _stamp(f: Path) -> list:
    st = f.stat()
    return [str(f.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load() -> dict[str, str]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _store(entries: dict[str, str]) -> None:
    target = cache_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".digests-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(entries, fh)
            os.replace(tmp, target)  # atomic: a reader in another process sees the old file or the new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.debug("weights digest cache %s not written: %s", target, exc)
