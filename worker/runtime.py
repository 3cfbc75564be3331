"""Per-process resources, created lazily and once: ledger engine, encoder, Milvus store, pixel store.

Nothing here runs at import time (Celery forks after import); ``reset_after_fork`` drops what a
forked child must not share with its parent.
"""

from __future__ import annotations

import logging
import threading
from functools import cached_property

from config.settings import Settings
from worker.encoders import Encoder, create_encoder
from worker.errors import ServiceUnavailable
from worker.index import MilvusStore, running_server_uri
from worker.index.milvus_store import VersionNames
from worker.ledger import Ledger, make_engine
from worker.pixels import DirectoryPixelStore, PixelStore

__all__ = ["Runtime", "resolve_milvus_uri"]

log = logging.getLogger(__name__)


def resolve_milvus_uri(settings: Settings) -> str:
    """``IMGSYNC_MILVUS_URI``, or the embedded server's when it is empty.

    Raises:
        ServiceUnavailable: empty setting and no embedded server running.
    """
    if settings.milvus_uri:
        return settings.milvus_uri
    uri = running_server_uri(settings.milvus_data_dir)
    if uri is None:
        raise ServiceUnavailable(
            "Milvus",
            "IMGSYNC_MILVUS_URI",
            f"embedded server under {settings.milvus_data_dir}",
            "not running: start `imgsync up`, or set IMGSYNC_MILVUS_URI",
        )
    return uri


class Runtime:
    """What a worker process needs, built on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._names: VersionNames | None = None

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(make_engine(self.settings.effective_database_url))

    @cached_property
    def encoder(self) -> Encoder:
        enc = create_encoder(self.settings.encoder)
        enc.load()
        return enc

    @cached_property
    def store(self) -> MilvusStore:
        return MilvusStore(resolve_milvus_uri(self.settings), self.settings.milvus_token)

    @cached_property
    def pixels(self) -> PixelStore:
        return DirectoryPixelStore(self.settings.pixel_dir)

    @property
    def model_id(self) -> str:
        return self.encoder.model_id

    def names(self) -> VersionNames:
        """The collections this worker writes to (its model's version), created on first use."""
        if self._names is None:
            with self._lock:
                if self._names is None:
                    names = self.store.ensure_version(self.model_id, self.encoder.dim)
                    self.ledger.record_version(names.model_id, names.images, names.skus, self.encoder.dim)
                    self._names = names
        return self._names

    def reset_after_fork(self) -> None:
        """Drop connections inherited from a parent process."""
        if "ledger" in self.__dict__:
            self.ledger.engine.dispose(close=False)
        if "store" in self.__dict__:
            del self.__dict__["store"]
        self._names = None
