"""The typed error hierarchy: the type decides retry (transient) or give-up (permanent)."""

from __future__ import annotations

import re

from schemas.reasons import Reason

__all__ = [
    "ImgsyncError",
    "PermanentError",
    "TransientError",
    "ConfigError",
    "ServiceUnavailable",
    "hide_passwords",
]

#: ``scheme://user:password@`` in a URL: the password part
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)(?P<secret>\S*)@")


def hide_passwords(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``: for messages and logs."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***@", text)


class ImgsyncError(Exception):
    """Base of every error imgsync raises on purpose."""


class PermanentError(ImgsyncError):
    """This image can never be indexed as it is: record ``reason`` and stop."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(reason)


class TransientError(ImgsyncError):
    """A passing fault (network, Milvus down, CUDA OOM): retry with backoff."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(reason)


class ConfigError(ImgsyncError):
    """A setting is wrong; the message names the setting and the valid choices."""


class ServiceUnavailable(TransientError):
    """A required service (broker, database, Milvus) cannot be reached: transient for a worker, exit
    status 3 for the CLI. The message names the setting and the address tried."""

    def __init__(self, service: str, setting: str, target: str, cause: str, *, state: str = "unreachable") -> None:
        reason = Reason.index_unavailable if service.lower().startswith("milvus") else Reason.internal_error
        target, cause = hide_passwords(target), hide_passwords(cause)
        named = f" ({setting})" if setting else ""
        super().__init__(reason, f"{service} {state} at {target}{named}: {cause}")
        self.service = service
        self.setting = setting
        self.target = target
        self.cause = cause
        #: what is wrong with it: ``unreachable``, ``failing`` (it answered, then failed), ``full``
        self.state = state
