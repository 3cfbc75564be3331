"""Per-process resources, created lazily and once: ledger engine, encoder, Milvus store, pixel store.

Nothing here runs at import time (Celery forks after import); ``reset_after_fork`` drops what a
forked child must not share with its parent.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from functools import cached_property

from config.settings import Settings
from schemas.reasons import Reason
from worker.encoders import Encoder, create_encoder
from worker.encoders.spec import anchored_spec
from worker.errors import ServiceUnavailable, TransientError
from worker.index import MilvusStore, running_server_uri
from worker.index.milvus_store import VersionNames, store_for, version_names
from worker.ledger import Ledger, VersionRow, VersionStatus, make_engine
from worker.pixels import PixelStore, open_pixel_store

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
    """What a worker process needs, built on first use.

    Model versions come from the ledger: every active version (serving, standby, building) gets each
    image; the configured ``IMGSYNC_MODEL`` only decides what serves on a fresh install.
    """

    #: seconds a worker trusts its list of active versions (a cutover is seen within this time)
    VERSIONS_TTL = 2.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._versions: tuple[float, list[VersionRow]] | None = None
        self._encoders: dict[str, Encoder] = {}
        self._names: dict[str, VersionNames] = {}

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(make_engine(self.settings.effective_database_url))

    @cached_property
    def encoder(self) -> Encoder:
        """The configured model (``IMGSYNC_MODEL``)."""
        enc = create_encoder(self.settings.encoder)
        enc.load()
        return enc

    @cached_property
    def store(self) -> MilvusStore:
        return store_for(self.settings, resolve_milvus_uri(self.settings))

    @cached_property
    def pixels(self) -> PixelStore:
        return open_pixel_store(self.settings.effective_pixel_store, self.settings.pixel_ttl_seconds)

    # --- model versions ----------------------------------------------------------------------

    def active_versions(self) -> list[VersionRow]:
        """Serving first, then standby/building versions; on a fresh install the configured model is
        registered as the serving version first."""
        cached = self._versions
        if cached is not None and time.monotonic() - cached[0] < self.VERSIONS_TTL:
            return cached[1]
        with self._lock:
            rows = self.ledger.versions()
            if not any(r.status == VersionStatus.serving for r in rows):
                self._bootstrap()
                rows = self.ledger.versions()
            self._versions = (time.monotonic(), rows)
            for gone in set(self._encoders) - {r.model_id for r in rows}:
                del self._encoders[gone]  # a retired version's model leaves memory
            return rows

    def serving(self) -> VersionRow:
        return self.active_versions()[0]

    def names(self) -> VersionNames:
        """The serving version's collections."""
        return self.names_for(self.serving())

    def version_for(self, model_id: str) -> VersionRow | None:
        """The active version of ``model_id`` (None when it is retired or unknown)."""
        for row in self.active_versions():
            if row.model_id == model_id:
                return row
        return None

    def encoder_for(self, model_id: str) -> Encoder:
        """The loaded model of a version, by the spec the ledger holds for it.

        Raises:
            TransientError: the version is unknown, or its spec now loads another model (e.g. its
                checkpoint file changed): the items retry and end ``retries_exhausted``.
        """
        enc = self._encoders.get(model_id)
        if enc is not None:
            return enc
        with self._lock:
            if model_id in self._encoders:
                return self._encoders[model_id]
            row = self.ledger.version(model_id)
            if row is None:
                raise TransientError(Reason.device_error, f"model version {model_id} is unknown to the ledger")
            # the configured model (its spec as written or anchored), or a version made before specs were kept
            if not row.spec or row.spec in (self.settings.model, anchored_spec(self.settings.model)):
                enc = self.encoder
            else:
                enc = create_encoder(replace(self.settings.encoder, spec=row.spec)).load()
            if enc.model_id != model_id:
                raise TransientError(
                    Reason.device_error,
                    f"model spec {row.spec} now loads {enc.model_id}, not version {model_id} (weights changed?)",
                )
            self._encoders[model_id] = enc
            return enc

    def names_for(self, row: VersionRow) -> VersionNames:
        """The collections of a version, created (and, for the serving one, aliased) on first use."""
        names = self._names.get(row.model_id)
        if names is None:
            with self._lock:
                names = self.store.ensure_version(
                    row.model_id, row.dim, serve_if_unset=row.status == VersionStatus.serving
                )
                self._names[row.model_id] = names
        return names

    def forget_collections(self) -> None:
        """After a :class:`~worker.index.CollectionMissing`: every version's collections are made
        (and loaded, and the serving aliases set) again at their next use."""
        with self._lock:
            self._names.clear()
            if "store" in self.__dict__:
                self.store.forget_collections()

    def _bootstrap(self) -> None:
        """A fresh index: the configured model serves. Its collections (and the serving aliases) are
        created in Milvus at first use (:meth:`names_for`)."""
        enc = self.encoder
        names = version_names(enc.model_id)
        row = self.ledger.register_version(
            enc.model_id, anchored_spec(self.settings.model), names.images, names.skus, enc.dim, serve_if_first=True
        )
        if row.status == VersionStatus.serving:
            log.info("model version %s serves (first version of this index)", enc.model_id)

    def register_candidate(self, spec: str) -> VersionRow:
        """Register ``spec``'s model as a version to build next to the serving one (``reindex --model``).

        Loads the model once to learn its id and dim; creates its collections."""
        spec = anchored_spec(spec)  # recorded for workers that may run in another folder
        enc = create_encoder(replace(self.settings.encoder, spec=spec)).load()
        self.active_versions()  # a fresh install serves the configured model first
        names = self.store.ensure_version(enc.model_id, enc.dim)
        row = self.ledger.register_version(enc.model_id, spec, names.images, names.skus, enc.dim, serve_if_first=False)
        with self._lock:
            self._encoders[enc.model_id] = enc
            self._versions = None
        return row

    def forget_versions(self) -> None:
        """Re-read the versions at the next use."""
        self._versions = None

    def reset_after_fork(self) -> None:
        """Drop connections inherited from a parent process."""
        if "ledger" in self.__dict__:
            self.ledger.engine.dispose(close=False)
        if "store" in self.__dict__:
            del self.__dict__["store"]
        self._names = {}
        self._versions = None

