"""Can a model's weights be had? Checked before a worker starts, so a missing download is one clear
error instead of minutes of retries."""

from __future__ import annotations

import socket
from pathlib import Path

from worker.encoders.spec import parse_spec
from worker.errors import ConfigError

__all__ = ["hub_reachable", "weights_cached", "check_weights_available"]


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the model hub answers on HTTPS (never when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def weights_cached(spec_text: str) -> bool:
    """Whether the weights a spec names are on this machine (local file, or in the hub cache).
    Specs without downloadable weights (random init, ``tiny``) count as available."""
    spec = parse_spec(spec_text)
    if spec.backend not in ("open_clip",) or not spec.weights:
        return True
    if Path(spec.weights).expanduser().exists():
        return True
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache

        cfg = open_clip.get_pretrained_cfg(spec.name, spec.weights)
        hub = (cfg.get("hf_hub") or "").rstrip("/")
        if not hub:
            return False
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(hub, filename), str):
                return True
    except Exception:  # noqa: BLE001 - any doubt means "not cached"
        return False
    return False


def check_weights_available(spec_text: str) -> None:
    """Raise a ConfigError naming IMGSYNC_MODEL when the weights are neither here nor downloadable."""
    if weights_cached(spec_text) or hub_reachable():
        return
    raise ConfigError(
        f"IMGSYNC_MODEL={spec_text}: its weights are not cached here and the model hub is unreachable; "
        "set IMGSYNC_MODEL to a local checkpoint (open_clip:<arch>@/path/to/weights.pt) or to `tiny` for a test run"
    )
