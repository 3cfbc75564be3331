"""The ``tiny`` model: a 2-layer open_clip ViT with random weights, built by the real open_clip
loading code. For tests and the offline demo; it says so loudly."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from worker.encoders.open_clip_backend import OpenClipEncoder

__all__ = ["TinyEncoder", "TINY_ARCH", "register_tiny_config"]

log = logging.getLogger(__name__)

#: The open_clip architecture name of the tiny model.
TINY_ARCH = "imgsync-tiny"
_CONFIG = Path(__file__).with_name(f"{TINY_ARCH}.json")
_registered = threading.Lock()


def register_tiny_config() -> None:
    """Add the tiny architecture to open_clip's registry (idempotent)."""
    import open_clip

    with _registered:
        if TINY_ARCH not in open_clip.list_models():
            open_clip.add_model_config(_CONFIG)


class TinyEncoder(OpenClipEncoder):
    """open_clip ``imgsync-tiny`` (64-d, 64×64 input), seeded random weights unless a file is given."""

    def precheck(self) -> None:
        register_tiny_config()
        super().precheck()

    def _load(self) -> None:
        register_tiny_config()
        if not self.spec.weights:
            log.warning("USING THE TINY TEST MODEL WITH RANDOM WEIGHTS: search results are not meaningful")
            self.weights_identity = "random-seed0"
        super()._load()
