"""The ``random:<dim>`` control: a vector that depends on nothing but the exact model-input pixels.

It is the floor of ``imgsync evaluate``: any model that sees the images must beat it. Each vector is
drawn from a generator seeded by the sha256 of the image's model-input pixels, so it is the same in
every process and every run, and identical pixels give identical vectors, while two photos of one
product share nothing. It says so loudly when loaded.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

import numpy as np

from worker.encoders.base import Encoder, PreprocessCfg, l2_normalize
from worker.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["RandomEncoder", "RANDOM_DIM_MAX"]

log = logging.getLogger(__name__)

#: the largest dim a control may ask for (Milvus' own limit is 32768)
RANDOM_DIM_MAX = 4096
#: model input side, pixels: small, the control looks at nothing but a digest of them
_SIDE = 32


class RandomEncoder(Encoder):
    """``random:<dim>``: unit vectors from a generator seeded by the pixels' sha256; no weights."""

    capabilities = frozenset({"image"})

    def _load(self) -> None:
        try:
            dim = int(self.spec.name)
        except ValueError:
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: the random control is random:<dim>, e.g. random:64") from None
        if not 2 <= dim <= RANDOM_DIM_MAX:
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: dim {dim} is not within 2..{RANDOM_DIM_MAX}")
        if self.spec.weights:
            raise ConfigError(f"IMGSYNC_MODEL={self.spec}: the random control takes no @weights")
        log.warning("MODEL %s IS THE RANDOM CONTROL: its vectors carry no information about the images", self.spec)
        self.dim = dim
        self.weights_identity = "pixels-sha256"
        self.preprocess_cfg = PreprocessCfg(
            size=(_SIDE, _SIDE), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", resize_mode="squash"
        )

    def _encode_now(self, pixels: list[np.ndarray | torch.Tensor]) -> np.ndarray:
        host = [p if isinstance(p, np.ndarray) else p.permute(1, 2, 0).cpu().numpy() for p in pixels]
        return l2_normalize(np.stack([self._vector(p) for p in host]))

    def _vector(self, pixels: np.ndarray) -> np.ndarray:
        digest = hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return rng.standard_normal(self.dim, dtype=np.float32)

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        raise NotImplementedError("the random control encodes the uint8 pixels directly")
