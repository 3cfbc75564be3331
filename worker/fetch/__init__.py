"""Fetchers: image bytes from a uri, bounded, with typed errors."""

from __future__ import annotations

from urllib.parse import urlparse

from config.settings import FetchConfig
from schemas.reasons import Reason
from worker.errors import PermanentError
from worker.fetch.local import fetch_local

__all__ = ["fetch_bytes"]


def fetch_bytes(uri: str, cfg: FetchConfig) -> bytes:
    """The bytes at a normalized ``uri`` (``file://``, ``s3://``, ``http(s)://``).

    Raises:
        PermanentError: with a reason code (``not_found``, ``fetch_too_large``, ``forbidden_address`` ...).
        TransientError: a fault worth retrying (timeouts, 5xx, connection errors).
    """
    scheme = urlparse(uri).scheme
    match scheme:
        case "file":
            return fetch_local(uri, cfg)
        case "s3":
            from worker.fetch.s3 import fetch_s3

            return fetch_s3(uri, cfg)
        case "http" | "https":
            from worker.fetch.http import fetch_http

            return fetch_http(uri, cfg)
        case _:
            raise PermanentError(Reason.invalid_event, f"{uri}: scheme {scheme!r} is not one of file, s3, http, https")
