"""``create_encoder``: the only way to get a model."""

from __future__ import annotations

from config.settings import EncoderConfig
from worker.encoders.base import Encoder
from worker.encoders.spec import BACKENDS, anchor, parse_spec
from worker.errors import ConfigError

__all__ = ["create_encoder"]


def create_encoder(config: EncoderConfig | str) -> Encoder:
    """An (unloaded) encoder for a model spec; call ``.load()`` or just use it.

    Raises:
        ConfigError: a malformed spec or an unknown backend (the message lists the valid ones).
    """
    if isinstance(config, str):
        config = EncoderConfig(spec=config, device="auto", precision="fp32")
    spec = anchor(parse_spec(config.spec))  # local paths absolute: one model, one id, any folder
    match spec.backend:
        case "open_clip":
            from worker.encoders.open_clip_backend import OpenClipEncoder

            return OpenClipEncoder(spec, device=config.device, precision=config.precision)
        case "hf":
            from worker.encoders.hf_backend import HfEncoder

            return HfEncoder(spec, device=config.device, precision=config.precision)
        case "timm":
            from worker.encoders.timm_backend import TimmEncoder

            return TimmEncoder(spec, device=config.device, precision=config.precision)
        case "tiny":
            from worker.encoders.tiny import TinyEncoder

            return TinyEncoder(spec, device=config.device, precision=config.precision)
        case "random":
            from worker.encoders.random_backend import RandomEncoder

            return RandomEncoder(spec, device=config.device, precision=config.precision)
        case _:
            raise ConfigError(f"IMGSYNC_MODEL: unknown backend {spec.backend!r}; valid: {', '.join(BACKENDS)}")
