"""The ``open_clip`` backend: any architecture of open_clip's registry, weights by tag or file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from worker.encoders.base import Encoder, PreprocessCfg, file_digest, seeded_init
from worker.errors import ConfigError

__all__ = ["OpenClipEncoder"]

log = logging.getLogger(__name__)

class OpenClipEncoder(Encoder):
    """open_clip ``create_model_and_transforms(name, pretrained=weights)``."""

    capabilities = frozenset({"image", "text"})

    def precheck(self) -> None:
        """The architecture exists, a weights path or ``local-dir:`` folder exists, a pretrained tag
        is one open_clip knows for the architecture."""
        import open_clip

        name, weights = self.spec.name, self.spec.weights
        known = open_clip.list_models()
        if name not in known and not name.startswith(("hf-hub:", "local-dir:")):
            sample = ", ".join(m for m in known if m.startswith(("ViT-B", "ViT-L", "ViT-SO", "RN50")))[:200]
            raise ConfigError(
                f"IMGSYNC_MODEL: open_clip has no architecture {name!r} "
                f"(e.g. {sample}; `python -c 'import open_clip; print(open_clip.list_models())'` lists all)"
            )
        if weights and not Path(weights).expanduser().exists():
            if "/" in weights or weights.startswith((".", "~")):
                raise ConfigError(f"IMGSYNC_MODEL: weights file {weights!r} does not exist")
            tags = open_clip.list_pretrained_tags_by_model(name)
            if tags and weights not in tags:
                raise ConfigError(f"IMGSYNC_MODEL: {name!r} has no pretrained tag {weights!r}; valid: {', '.join(tags)}")
        elif not weights and name.startswith("local-dir:"):
            folder = Path(name.removeprefix("local-dir:")).expanduser()
            if not folder.is_dir():
                raise ConfigError(f"IMGSYNC_MODEL: model folder {str(folder)!r} does not exist")

    def _load(self) -> None:
        import open_clip

        self.precheck()
        name, weights = self.spec.name, self.spec.weights
        pretrained: str | None = weights
        if weights:
            local = Path(weights).expanduser()
            if local.exists():
                pretrained = str(local.resolve())
                self.weights_identity = f"file-{file_digest(local)}"
        elif name.startswith("local-dir:"):  # the folder holds the weights: its content is their identity
            self.weights_identity = f"dir-{file_digest(Path(name.removeprefix('local-dir:')).expanduser())}"
        elif name.startswith("hf-hub:"):  # the hub repository holds the weights
            self.weights_identity = "hub"
        elif self.spec.backend != "tiny":
            log.warning(
                "MODEL %s HAS RANDOM WEIGHTS (no @weights given): vectors are for tests, not for search",
                self.spec,
            )
        try:
            with seeded_init():
                model, _, _ = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, device=self.device
                )
        except ConfigError:
            raise
        except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError for bad weights
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: cannot load weights: {exc}") from exc
        model.eval()
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._tokenizer = None  # read on the first text: image-only use never needs it (nor the hub)
        cfg = model.visual.preprocess_cfg
        size = cfg["size"]
        self.preprocess_cfg = PreprocessCfg(
            size=(size, size) if isinstance(size, int) else (int(size[0]), int(size[1])),
            mean=tuple(float(v) for v in _triple(cfg["mean"])),  # type: ignore[arg-type]
            std=tuple(float(v) for v in _triple(cfg["std"])),  # type: ignore[arg-type]
            interpolation=cfg.get("interpolation") or "bicubic",
            resize_mode=cfg.get("resize_mode") or "shortest",
            fill_color=int(cfg.get("fill_color") or 0),
            mode=cfg.get("mode") or "RGB",
        )
        self.dim = int(model.visual.output_dim) if hasattr(model.visual, "output_dim") else self._probe_dim()

    def _probe_dim(self) -> int:
        h, w = self.preprocess_cfg.size
        with torch.inference_mode():
            return int(self.model.encode_image(torch.zeros(1, 3, h, w, device=self.device)).shape[-1])

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def _forward_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens)

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        """open_clip's tokenizer of the model, loaded on first use.

        Raises:
            ConfigError: it cannot be loaded (an architecture whose tokenizer lives on the hub, offline).
        """
        if self._tokenizer is None:
            import open_clip

            try:
                self._tokenizer = open_clip.get_tokenizer(self.spec.name)
            except Exception as exc:  # noqa: BLE001 - OSError/ValueError from the hub or a folder
                raise ConfigError(f"IMGSYNC_MODEL={self.spec}: no tokenizer for text search: {exc}") from exc
        return self._tokenizer


def _triple(v: object) -> tuple[float, ...]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    return tuple(float(x) for x in v)  # type: ignore[union-attr]
