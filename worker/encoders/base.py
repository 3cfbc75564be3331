"""The encoder contract: ``preprocess → encode`` (+ ``encode_text``, ``warmup``), and its data."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from schemas.reasons import Reason
from worker.encoders.digest import file_digest
from worker.errors import TransientError
from worker.imaging.geometry import apply_geometry

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "Encoder", "ModelSpec", "PendingVectors", "PreprocessCfg", "l2_normalize", "file_digest", "seeded_init", "RANDOM_INIT_SEED",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Seed of random-initialised weights, so every process builds the very same model.
RANDOM_INIT_SEED = 0


@contextmanager
def seeded_init() -> Iterator[None]:
    """Build a model from ``RANDOM_INIT_SEED`` without disturbing the caller's RNG. One thread at a
    time: torch's generator is process-global, and two threads initialising at once would interleave
    their draws and build different weights (seen with searches running during a model build)."""
    import torch

    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield


_INIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``<backend>:<name>[@<weights>]``."""

    backend: str
    name: str
    weights: str | None = None

    def __str__(self) -> str:
        base = self.backend if self.backend == "tiny" else f"{self.backend}:{self.name}"
        return f"{base}@{self.weights}" if self.weights else base


@dataclass(frozen=True)
class PreprocessCfg:
    """How pixels are prepared for a model, read from the model's own config.

    ``size`` is (height, width); ``resize_mode`` is ``shortest`` (resize the short side to
    ``resize_to`` — default the crop size — then centre crop), ``longest`` (resize the long side, pad
    with ``fill_color``) or ``squash``. ``geometry`` names who computes the pixels: ``imgsync`` (our
    PIL code, identical to torchvision/open_clip/timm) or ``hf`` (the model's own HF image processor).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    mode: str = "RGB"
    resize_to: int | None = None
    geometry: str = "imgsync"

    @property
    def hash(self) -> str:
        """A short digest that changes whenever any of the preprocessing changes."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class PendingVectors:
    """Vectors that :meth:`Encoder.encode_async` queued on a device; ``result()`` waits for them."""

    def __init__(self, ready: np.ndarray | None, host: torch.Tensor | None = None, done: torch.cuda.Event | None = None):
        self._ready, self._host, self._done = ready, host, done
        #: launched on a device queue (CUDA), not computed before :meth:`Encoder.encode_async` returned
        self.on_device = done is not None

    def result(self) -> np.ndarray:
        """The L2-normalized float32 vectors (a device fault surfaces here)."""
        if self._ready is None:
            assert self._host is not None and self._done is not None
            self._done.synchronize()
            self._ready = l2_normalize(self._host.numpy())
            self._host = self._done = None
        return self._ready


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class Encoder(ABC):
    """An image (and maybe text) embedding model with its preprocessing.

    Subclasses implement ``_load`` (build the torch module on ``self.device``),
    ``_forward_images`` and, when they have a text tower, ``_forward_text``.
    """

    #: what the model can embed: "image", and "text" for CLIP-like models
    capabilities: frozenset[str] = frozenset({"image"})

    def __init__(self, spec: ModelSpec, *, device: str = "auto", precision: str = "fp32") -> None:
        self.spec = spec
        self._device_setting = device
        self.precision = precision
        self._lock = threading.Lock()
        self._loaded = False
        self.preprocess_cfg: PreprocessCfg
        self.dim: int
        self.weights_identity: str = spec.weights or "random"

    # --- identity ----------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """backend, name, weights identity and preprocessing, in one string."""
        self.load()
        return f"{self.spec.backend}:{self.spec.name}@{self.weights_identity}#{self.preprocess_cfg.hash}"

    # --- lifecycle ---------------------------------------------------------------------------

    def load(self) -> Encoder:
        """Build the model once (thread-safe); later calls return at once."""
        if self._loaded:
            return self
        with self._lock:
            if not self._loaded:
                from worker.encoders.device import resolve_device

                self.device = resolve_device(self._device_setting)
                if self.device.type != "cuda" and self.precision != "fp32":
                    log.warning("IMGSYNC_PRECISION=%s applies on CUDA only: %s runs fp32", self.precision, self.device)
                self._load()
                self._loaded = True
                log.info("encoder %s loaded on %s (dim %d)", self.spec, self.device, self.dim)
        return self

    @abstractmethod
    def _load(self) -> None:
        """Build the model; set ``preprocess_cfg`` and ``dim``."""

    def has_text_tower(self) -> bool | None:
        """Whether the model encodes text; None when that is known only once it is loaded."""
        return "text" in self.capabilities

    def precheck(self) -> None:
        """Refuse, without loading anything, a spec that cannot load: an unknown architecture, a
        missing weights file or folder (what can be told cheaply; loading checks the rest).

        Raises:
            ConfigError: naming IMGSYNC_MODEL and what is wrong.
        """

    def warmup(self, batch_size: int = 2) -> None:
        """One forward pass on blank images, so the first real batch pays no start-up cost."""
        self.load()
        h, w = self.preprocess_cfg.size
        self.encode([np.zeros((h, w, 3), dtype=np.uint8)] * batch_size)

    # --- the contract ------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """Model-input pixels (uint8, H×W×3) of RGB images: the model's own resize/crop."""
        self.load()
        return self._geometry(list(images))

    def _geometry(self, images: list[Image.Image]) -> list[np.ndarray]:
        return [apply_geometry(img, self.preprocess_cfg) for img in images]

    def encode(self, pixels: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
        """L2-normalized float32 vectors, one row per model-input image: uint8 H×W×3 arrays, or
        uint8 3×H×W tensors already on the device (pictures decoded there).

        A CUDA out-of-memory error splits the batch in halves down to single images; a single
        image that still does not fit raises :class:`TransientError` (``device_error``).
        """
        self.load()
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encode_split(list(pixels))

    def encode_async(self, pixels: Sequence[np.ndarray | torch.Tensor]) -> PendingVectors:
        """:meth:`encode`, returning as soon as the work is queued on the device: on CUDA the forward
        pass and the copy of its vectors to (pinned) host memory are launched, and ``result()``
        waits for them, so the caller can do other work (write the previous batch) while the GPU
        computes. Elsewhere, and for backends with their own encode, the vectors are computed
        before it returns. A CUDA out-of-memory error at launch falls back to :meth:`encode`'s
        halving; a device fault after launch is raised by ``result()``."""
        self.load()
        if len(pixels) == 0 or self.device.type != "cuda" or type(self)._encode_now is not Encoder._encode_now:
            return PendingVectors(self.encode(pixels))
        import torch

        try:
            out = self._forward_batch(list(pixels))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return PendingVectors(self.encode(pixels))
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingVectors(None, host, done)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 vectors of ``texts``.

        Raises:
            ConfigError: the model has no text tower.
        """
        from worker.errors import ConfigError

        if "text" not in self.capabilities:
            raise ConfigError(f"model {self.spec} has no text tower: search by image instead")
        self.load()
        import torch

        with torch.inference_mode(), self._autocast():
            out = self._forward_text(list(texts))
        return l2_normalize(out.float().cpu().numpy())

    # --- internals ---------------------------------------------------------------------------

    def _encode_split(self, pixels: list[np.ndarray | torch.Tensor]) -> np.ndarray:
        import torch

        try:
            return self._encode_now(pixels)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            if len(pixels) == 1:
                raise TransientError(Reason.device_error, f"CUDA out of memory on one image: {exc}") from exc
            half = len(pixels) // 2
            log.warning("CUDA OOM on a batch of %d: splitting into %d + %d", len(pixels), half, len(pixels) - half)
            return np.concatenate([self._encode_split(pixels[:half]), self._encode_split(pixels[half:])])

    def _encode_now(self, pixels: list[np.ndarray | torch.Tensor]) -> np.ndarray:
        return l2_normalize(self._forward_batch(pixels).cpu().numpy())

    def _forward_batch(self, pixels: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Raw float32 embeddings on the device (queued there, not waited for, on CUDA)."""
        import torch

        x = self._batch(pixels).float().div_(255.0)
        mean = torch.tensor(self.preprocess_cfg.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess_cfg.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            out = self._forward_images(x)
        return out.float()

    def _batch(self, pixels: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """N×3×H×W uint8 on the device: host H×W×3 arrays are copied in one transfer (pinned on
        CUDA); 3×H×W tensors (decoded on the device) are taken where they are."""
        import torch

        host = [i for i, p in enumerate(pixels) if isinstance(p, np.ndarray)]
        moved = None
        if host:
            moved = torch.from_numpy(np.stack([pixels[i] for i in host]))  # n,H,W,3 uint8
            if self.device.type == "cuda":
                moved = moved.pin_memory().to(self.device, non_blocking=True)
            moved = moved.permute(0, 3, 1, 2)
            if len(host) == len(pixels):
                return moved
        slots: list[torch.Tensor] = [p.to(self.device) for p in pixels if not isinstance(p, np.ndarray)][::-1]
        from_host = iter(moved) if moved is not None else iter(())
        return torch.stack([next(from_host) if isinstance(p, np.ndarray) else slots.pop() for p in pixels])

    def _autocast(self):  # type: ignore[no-untyped-def]
        import contextlib

        import torch

        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @abstractmethod
    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        """Raw embeddings of a normalized N×3×H×W batch."""

    def _forward_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError
