"""Device selection for encoders."""

from __future__ import annotations

import re

from worker.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(setting: str):  # type: ignore[no-untyped-def]
    """The torch device for ``IMGSYNC_DEVICE`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        ConfigError: an unknown value, or CUDA asked for where none is available.
    """
    import torch

    value = setting.strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", value)
    if not m:
        raise ConfigError(f"IMGSYNC_DEVICE={setting!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"IMGSYNC_DEVICE={setting!r} but no CUDA device is available (use auto or cpu)")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"IMGSYNC_DEVICE={setting!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return torch.device(f"cuda:{index}")
