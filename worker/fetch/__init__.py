"""Fetchers: image bytes from a uri, bounded, with typed errors."""

from __future__ import annotations

from urllib.parse import urlparse

from config.settings import FetchConfig
from schemas.reasons import Reason
from worker.errors import PermanentError
from worker.fetch.local import fetch_local

__all__ = ["fetch_bytes"]


def fetch_bytes(uri: str, cfg: FetchConfig) -> bytes:
    """The bytes at a normalized ``uri``.

    Raises:
        PermanentError: with a reason code (``not_found``, ``fetch_too_large`` ...).
        TransientError: a fault worth retrying.
    """
    scheme = urlparse(uri).scheme
    match scheme:
        case "file":
            return fetch_local(uri, cfg)
        case _:
            raise PermanentError(
                Reason.invalid_event, f"{uri}: scheme {scheme!r} is not supported by this build (file://)"
            )
