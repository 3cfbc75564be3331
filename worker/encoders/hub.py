"""Can a model's weights be had? Checked before a worker starts, so a missing download is one clear
error instead of minutes of retries."""

from __future__ import annotations

import socket
from pathlib import Path

from worker.encoders.spec import parse_spec
from worker.errors import ConfigError

__all__ = ["hub_reachable", "weights_cached", "check_weights_available"]


def hub_reachable(host: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the model hub answers (never when HF_HUB_OFFLINE is set): ``HF_ENDPOINT``'s host and
    port (a mirror) when set, else huggingface.co:443."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlsplit(constants.ENDPOINT)
    host = host or endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def weights_cached(spec_text: str) -> bool:
    """Whether the weights a spec names are on this machine (local file or folder, or in the hub
    cache). Specs without downloadable weights (random init, ``tiny``), and weights whose hub home
    cannot be told, count as available: the backend then reports what is missing itself."""
    spec = parse_spec(spec_text)
    if spec.backend == "hf":
        source = spec.weights or spec.name
        if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
            return True  # a local folder (a missing one is the backend's own clear error)
        return _in_hub_cache(source, ("config.json",))
    if spec.backend == "open_clip" and spec.name.startswith("hf-hub:") and not spec.weights:
        return _in_hub_cache(spec.name.removeprefix("hf-hub:"), ("open_clip_config.json",))
    if spec.backend not in ("open_clip", "timm") or not spec.weights:
        return True
    if Path(spec.weights).expanduser().exists():
        return True
    try:
        if spec.backend == "timm":
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(f"{spec.name.split('.')[0]}.{spec.weights}")
            hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
            files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
        else:
            import open_clip

            hub = open_clip.get_pretrained_cfg(spec.name, spec.weights).get("hf_hub")
            files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    except Exception:  # noqa: BLE001 - any doubt means "not cached"
        return False
    hub = (hub or "").rstrip("/")
    return _in_hub_cache(hub, files) if hub else False


def _in_hub_cache(repo: str, filenames: tuple[str, ...]) -> bool:
    """Whether one of ``filenames`` of hub repository ``repo`` is in the local hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo, f), str) for f in filenames)
    except Exception:  # noqa: BLE001 - a malformed repo id is not cached
        return False


def check_weights_available(spec_text: str) -> None:
    """Raise a ConfigError naming IMGSYNC_MODEL when the weights are neither here nor downloadable."""
    if weights_cached(spec_text) or hub_reachable():
        return
    raise ConfigError(
        f"IMGSYNC_MODEL={spec_text}: its weights are not cached here and the model hub is unreachable; "
        "set IMGSYNC_MODEL to a local checkpoint (open_clip:<arch>@/path/to/weights.pt) or to `tiny` for a test run"
    )
