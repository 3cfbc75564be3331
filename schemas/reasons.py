"""Reason codes: why an image was not indexed. Shown by ``imgsync failures``, counted by metrics."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason", "PERMANENT_REASONS"]


class Reason(StrEnum):
    """Why an image ended ``failed``. Values are stable: they are stored in the ledger."""

    not_found = "not_found"
    fetch_timeout = "fetch_timeout"
    fetch_too_large = "fetch_too_large"
    forbidden_address = "forbidden_address"
    unsupported_format = "unsupported_format"
    truncated = "truncated"
    decompression_bomb = "decompression_bomb"
    corrupt = "corrupt"
    too_small = "too_small"
    invalid_event = "invalid_event"
    retries_exhausted = "retries_exhausted"
    # transient causes, recorded while retrying and in the final ``retries_exhausted`` detail
    fetch_error = "fetch_error"
    index_unavailable = "index_unavailable"
    device_error = "device_error"
    internal_error = "internal_error"


#: Reasons that are final at once: retrying cannot help.
PERMANENT_REASONS = frozenset(
    {
        Reason.not_found,
        Reason.fetch_too_large,
        Reason.forbidden_address,
        Reason.unsupported_format,
        Reason.truncated,
        Reason.decompression_bomb,
        Reason.corrupt,
        Reason.too_small,
        Reason.invalid_event,
        Reason.retries_exhausted,
    }
)
