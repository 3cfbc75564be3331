"""The ``timm`` backend: any timm model as a pooled-feature extractor (``num_classes=0``), with its
own data config (input size, crop_pct, interpolation, mean, std) as preprocessing."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from worker.encoders.base import Encoder, PreprocessCfg, file_digest, seeded_init
from worker.errors import ConfigError

__all__ = ["TimmEncoder"]

log = logging.getLogger(__name__)


class TimmEncoder(Encoder):
    """``timm:<model>[@<pretrained tag | checkpoint file>]``; image only (no text tower)."""

    capabilities = frozenset({"image"})

    def precheck(self) -> None:
        """timm knows the model; a weights path exists."""
        import timm

        name, weights = self.spec.name, self.spec.weights
        if not timm.is_model(name.split(".")[0]):
            raise ConfigError(
                f"IMGSYNC_MODEL: timm has no model {name!r} (`python -c 'import timm; print(timm.list_models())'` lists them)"
            )
        if weights and not Path(weights).expanduser().exists() and ("/" in weights or weights.startswith((".", "~"))):
            raise ConfigError(f"IMGSYNC_MODEL: weights file {weights!r} does not exist")

    def _load(self) -> None:
        import timm
        from timm.data import resolve_data_config

        self.precheck()
        name, weights = self.spec.name, self.spec.weights
        base = name.split(".")[0]
        checkpoint: Path | None = None
        if weights and Path(weights).expanduser().exists():
            checkpoint = Path(weights).expanduser().resolve()
            self.weights_identity = f"file-{file_digest(checkpoint)}"
            pretrained = False
        elif weights:
            name, pretrained = f"{base}.{weights}", True
        else:
            pretrained = False
            log.warning("MODEL %s HAS RANDOM WEIGHTS (no @weights given): vectors are for tests, not for search", self.spec)
        try:
            with seeded_init():
                model = timm.create_model(name, pretrained=pretrained, num_classes=0)
            if checkpoint is not None:
                _load_checkpoint(model, checkpoint)
        except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/OSError/KeyError here
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: cannot load weights: {exc}") from exc
        model.eval().to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        cfg = resolve_data_config({}, model=model)
        _, h, w = cfg["input_size"]
        crop_pct, crop_mode = float(cfg.get("crop_pct") or 1.0), cfg.get("crop_mode") or "center"
        if crop_mode == "squash":
            resize_mode, resize_to = "squash", None
        elif crop_mode == "center" and h == w:
            resize_mode, resize_to = "shortest", math.floor(h / crop_pct)
        else:
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: timm crop_mode {crop_mode!r} with input {h}×{w} is not supported")
        self.preprocess_cfg = PreprocessCfg(
            size=(int(h), int(w)),
            mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
            interpolation=str(cfg.get("interpolation") or "bilinear"),
            resize_mode=resize_mode,
            resize_to=resize_to,
        )
        self.dim = int(model.num_features)

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a timm checkpoint (``.pth``/``.safetensors``, bare or under ``state_dict``/``model``)
    into the head-less feature model. Its classifier weights, which training and the hub keep, are
    dropped; every other weight must match exactly (strict), so a checkpoint of another
    architecture fails instead of leaving random weights behind."""
    from timm.models import load_state_dict

    state = load_state_dict(str(path))
    classifier = model.pretrained_cfg.get("classifier")  # type: ignore[union-attr]
    heads = [classifier] if isinstance(classifier, str) else list(classifier or ())
    state = {k: v for k, v in state.items() if not any(k == h or k.startswith(f"{h}.") for h in heads)}
    model.load_state_dict(state, strict=True)
