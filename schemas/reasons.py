"""Reason codes: why an image was not indexed. Shown by ``imgsync failures``, counted by metrics."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason", "PERMANENT_REASONS", "NAMED_AFTER_RETRIES", "final_reason"]


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
    # (``fetch_timeout`` above is transient too, but names the failure itself: see final_reason)
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


#: Transient reasons that name the failure themselves when the retries run out: an image whose
#: server never answered in time ends ``fetch_timeout``, not the generic ``retries_exhausted``.
NAMED_AFTER_RETRIES = frozenset({Reason.fetch_timeout})


def final_reason(last: Reason | str) -> Reason:
    """The reason an image ends with once its retries are spent, ``last`` being its last fault's."""
    return Reason(last) if last in NAMED_AFTER_RETRIES else Reason.retries_exhausted
