"""The ``hf`` backend (transformers): CLIP, Chinese-CLIP, SigLIP/SigLIP2 (``get_image_features``)
and DINOv2 (the pooled CLS output), from a hub id or a local ``save_pretrained`` folder.

Geometry (resize/crop) is done by the model's own image processor with rescale and normalize turned
off, so the uint8 pixels handed between stages are exactly what the processor feeds the model;
mean/std are applied on the batch by the shared encoder code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from worker.encoders.base import Encoder, PreprocessCfg, file_digest
from worker.errors import ConfigError

__all__ = ["HfEncoder", "HF_FAMILIES"]

log = logging.getLogger(__name__)

#: model_type → whether it has a text tower
HF_FAMILIES = {"clip": True, "chinese_clip": True, "siglip": True, "siglip2": True, "dinov2": False}
#: files that carry a tokenizer in a save_pretrained folder
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")
#: a tokenizer with no more tokens than this has no real vocabulary (special tokens only)
_MIN_VOCAB = 5
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HfEncoder(Encoder):
    """``hf:<hub id | local dir>`` or ``hf:<label>@<hub id | local dir>``."""

    def has_text_tower(self) -> bool | None:
        """Known from the model's config, read when it loads."""
        return "text" in self.capabilities if self._loaded else None

    def precheck(self) -> None:
        """A local model folder exists (a hub id is only checked by loading)."""
        source = self.spec.weights or self.spec.name
        if not Path(source).expanduser().exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: folder {source!r} does not exist")

    def _load(self) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        self.precheck()
        source = self.spec.weights or self.spec.name
        local = Path(source).expanduser()
        is_local = local.exists()
        path = str(local.resolve()) if is_local else source
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=is_local)
        except Exception as exc:  # noqa: BLE001 - OSError/ValueError from the hub or a bad folder
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: cannot read the model config: {exc}") from exc
        family = config.model_type
        if family not in HF_FAMILIES:
            raise ConfigError(
                f"IMGSYNC_MODEL={self.spec}: model type {family!r} is not supported; valid: {', '.join(HF_FAMILIES)}"
            )
        try:
            model, info = AutoModel.from_pretrained(path, local_files_only=is_local, output_loading_info=True)
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=is_local)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: cannot load model or image processor: {exc}") from exc
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # transformers would fill them with random values and only print a report
            raise ConfigError(
                f"IMGSYNC_MODEL={self.spec}: the checkpoint lacks {len(missing)} weight(s) of the model "
                f"(e.g. {', '.join(missing[:3])}); they would be random"
            )
        self.family = family
        self.capabilities = frozenset({"image", "text"} if HF_FAMILIES[family] else {"image"})
        self.weights_identity = f"dir-{file_digest(local)}" if is_local else source
        self.model = model.eval().to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.processor = processor
        self._path, self._is_local = path, is_local
        self.preprocess_cfg = _cfg_from_processor(processor, self.spec)
        h, w = self.preprocess_cfg.size
        with torch.inference_mode():
            self.dim = int(self._forward_images(torch.zeros(1, 3, h, w, device=self.device)).shape[-1])

    def _geometry(self, images: list[Image.Image]) -> list[np.ndarray]:
        rgb = [img if img.mode == "RGB" else img.convert("RGB") for img in images]
        if self.preprocess_cfg.resize_mode == "shortest":
            rgb = [_bounded_for_crop(img) for img in rgb]
        out = self.processor(images=rgb, return_tensors="pt", do_rescale=False, do_normalize=False)
        pixels = out["pixel_values"]
        if pixels.dtype != torch.uint8:
            pixels = pixels.round().clamp(0, 255).to(torch.uint8)
        return [p.permute(1, 2, 0).contiguous().numpy() for p in pixels]

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "dinov2":
            return self.model(pixel_values=x).pooler_output
        out = self.model.get_image_features(pixel_values=x)
        return getattr(out, "pooler_output", out)

    def _forward_text(self, texts: list[str]) -> torch.Tensor:
        from transformers import AutoTokenizer

        if self._is_local and not any((Path(self._path) / f).exists() for f in _TOKENIZER_FILES):
            # transformers 5 would build an empty tokenizer here and every text would embed alike
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: no tokenizer files in {self._path} for text search")
        tok = getattr(self, "_tokenizer", None)
        if tok is None:
            try:
                tok = AutoTokenizer.from_pretrained(self._path, local_files_only=self._is_local)
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"IMGSYNC_MODEL={self.spec}: no tokenizer for text search: {exc}") from exc
            if len(tok) <= _MIN_VOCAB:
                raise ConfigError(
                    f"IMGSYNC_MODEL={self.spec}: the tokenizer has an empty vocabulary ({len(tok)} tokens)"
                )
            self._tokenizer = tok
        padding = "max_length" if self.family.startswith("siglip") else True
        enc = tok(texts, padding=padding, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")})
        return getattr(out, "pooler_output", out)


def _bounded_for_crop(img: Image.Image) -> Image.Image:
    """A very long, thin picture cut around its centre to :data:`CROP_FIRST_RATIO` times its short
    side before an HF processor resizes its short side and centre-crops: the processor would
    otherwise build all of it at the model's scale, as floats (224 × 1.1 million pixels, 3 GB, for
    an 8 × 40000 strip of a few kilobytes). The centre crop keeps the same part; the cut keeps the
    centre exactly (both ends lose the same number of pixels)."""
    from worker.imaging.geometry import CROP_FIRST_RATIO

    w, h = img.size
    short, long = min(w, h), max(w, h)
    if long <= CROP_FIRST_RATIO * short:
        return img
    keep = CROP_FIRST_RATIO * short
    keep += (long - keep) % 2  # the same number of pixels off each end: the centre does not move
    off = (long - keep) // 2
    return img.crop((off, 0, off + keep, h) if w > h else (0, off, w, off + keep))


def _cfg_from_processor(processor, spec) -> PreprocessCfg:  # type: ignore[no-untyped-def]
    d = processor.to_dict()
    if "max_num_patches" in d:  # SigLIP2 NaFlex: patches at the image's own aspect ratio, no fixed input
        raise ConfigError(
            f"IMGSYNC_MODEL={spec}: variable-resolution (NaFlex) image processors are not supported; "
            "use a fixed-resolution checkpoint of the model"
        )
    if d.get("do_rescale", True) and abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ConfigError(f"IMGSYNC_MODEL={spec}: image processor rescale_factor {d.get('rescale_factor')} is not 1/255")
    size, crop = d.get("size") or {}, d.get("crop_size") or {}
    if d.get("do_center_crop") and crop:
        out_hw = (int(crop["height"]), int(crop["width"]))
    elif "height" in size:
        out_hw = (int(size["height"]), int(size["width"]))
    else:
        raise ConfigError(f"IMGSYNC_MODEL={spec}: cannot tell the model input size from {size} / {crop}")
    normalize = d.get("do_normalize", True)
    mean = tuple(float(v) for v in (d.get("image_mean") or (0, 0, 0))) if normalize else (0.0, 0.0, 0.0)
    std = tuple(float(v) for v in (d.get("image_std") or (1, 1, 1))) if normalize else (1.0, 1.0, 1.0)
    resample = d.get("resample")
    return PreprocessCfg(
        size=out_hw,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=_PIL_RESAMPLE.get(int(resample), str(resample)) if resample is not None else "bilinear",
        resize_mode="shortest" if "shortest_edge" in size else "squash",
        resize_to=int(size["shortest_edge"]) if "shortest_edge" in size else None,
        geometry=f"hf:{type(processor).__name__}",
    )
