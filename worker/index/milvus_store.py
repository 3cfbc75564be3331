"""The Milvus store: model-versioned collections behind the serving aliases.

Collections ``imgsync_images__<slug>`` / ``imgsync_skus__<slug>`` hold one model version each;
the aliases ``imgsync_images`` / ``imgsync_skus`` point at the version that serves search.
Writes go to the writer's own version; reads and searches go through the aliases.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from schemas.reasons import Reason
from worker.errors import ServiceUnavailable, TransientError

__all__ = ["CollectionMissing", "MilvusStore", "store_for", "IMAGES_ALIAS", "SKUS_ALIAS", "version_names", "ImageEntity", "VersionNames"]

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGES_ALIAS = "imgsync_images"
SKUS_ALIAS = "imgsync_skus"
#: Strong consistency: a vector just written is visible to the next step in any process.
CONSISTENCY = "Strong"
URI_MAX = 4096
#: pymilvus pings every 10 s, also with no call in flight; gRPC Python servers (the Milvus Lite server)
#: allow one ping per 5 min without data and answer more with GOAWAY "too_many_pings", after which
#: the shared connection fails to recover. Ping only during calls, and no more often than allowed.
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False}
SKU_MAX = 256


@dataclass(frozen=True)
class VersionNames:
    model_id: str
    images: str
    skus: str


@dataclass(frozen=True)
class ImageEntity:
    image_id: str
    sku: str
    uri: str
    vector: np.ndarray
    content_hash: str
    model_id: str
    indexed_at: int  # epoch milliseconds


def version_names(model_id: str) -> VersionNames:
    """Collection names of a model version: a readable slug plus a digest of the full id."""
    readable = re.sub(r"[^0-9a-zA-Z]+", "_", model_id.split("#")[0]).strip("_")[:60]
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:10]
    slug = f"{readable}_{digest}"
    return VersionNames(model_id, f"{IMAGES_ALIAS}__{slug}", f"{SKUS_ALIAS}__{slug}")


class MilvusStore:
    """Thin, typed access to Milvus through ``pymilvus.MilvusClient``; one per process."""

    def __init__(
        self,
        uri: str,
        token: str = "",
        *,
        timeout: float = 30.0,
        index_type: str = "AUTOINDEX",
        index_params: dict | None = None,
        search_params: dict | None = None,
    ) -> None:
        self.uri = uri
        self._token = token
        self._timeout = timeout
        self._index_type = index_type
        self._index_params_extra = dict(index_params or {})
        self._search_params = dict(search_params or {})
        self._client = None
        self._lock = threading.Lock()
        self._ready: set[str] = set()
        #: collections (or aliases) this store has loaded for reading
        self._loaded: set[str] = set()

    # --- connection ----------------------------------------------------------------------------

    @property
    def client(self):  # type: ignore[no-untyped-def]
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from pymilvus import MilvusClient

                    try:
                        self._client = MilvusClient(
                            uri=self.uri, token=self._token, timeout=self._timeout, grpc_options=GRPC_OPTIONS
                        )
                    except Exception as exc:  # noqa: BLE001 - pymilvus raises many types here
                        raise ServiceUnavailable("Milvus", "IMGSYNC_MILVUS_URI", self.uri, str(exc)) from exc
        return self._client

    def ping(self) -> bool:
        try:
            self.client.list_collections()
            return True
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
                self._ready.clear()
                self._loaded.clear()

    # --- versions and aliases ------------------------------------------------------------------

    def ensure_version(self, model_id: str, dim: int, *, serve_if_unset: bool = False) -> VersionNames:
        """Create (once) and load the collections of a model version.

        With ``serve_if_unset`` the serving aliases are created for it when they do not exist yet (a
        fresh install); an existing alias is only ever moved by :meth:`point_aliases` (cutover).
        """
        names = version_names(model_id)
        if names.images in self._ready and not serve_if_unset:
            return names
        with _wrap("create collections"):
            c = self.client
            existing = set(c.list_collections())
            if names.images not in existing:
                c.create_collection(
                    names.images,
                    schema=self._image_schema(dim),
                    index_params=self._index_params(),
                    consistency_level=CONSISTENCY,
                )
            if names.skus not in existing:
                c.create_collection(
                    names.skus,
                    schema=self._sku_schema(dim),
                    index_params=self._index_params(),
                    consistency_level=CONSISTENCY,
                )
            if names.images not in self._ready:
                for coll in (names.images, names.skus):
                    c.load_collection(coll)  # after a server restart collections come back released
                    self._loaded.add(coll)
            if serve_if_unset:
                aliases = set(c.list_aliases().get("aliases", []))
                if IMAGES_ALIAS not in aliases:
                    c.create_alias(names.images, IMAGES_ALIAS)
                if SKUS_ALIAS not in aliases:
                    c.create_alias(names.skus, SKUS_ALIAS)
        self._ready.add(names.images)
        return names

    def point_aliases(self, names: VersionNames) -> None:
        """Cutover: move both serving aliases to ``names`` (``alter_alias`` is atomic per alias;
        images move first, SKUs right after)."""
        with _wrap("alter aliases"):
            c = self.client
            aliases = set(c.list_aliases().get("aliases", []))
            for alias, coll in ((IMAGES_ALIAS, names.images), (SKUS_ALIAS, names.skus)):
                if alias in aliases:
                    c.alter_alias(coll, alias)
                else:
                    c.create_alias(coll, alias)

    def has_version(self, names: VersionNames) -> bool:
        with _wrap("list collections"):
            existing = set(self.client.list_collections())
        return names.images in existing and names.skus in existing

    def index_type(self, collection: str) -> str | None:
        """The type of the vector index ``collection`` was built with (None when Milvus cannot say)."""
        try:
            with _wrap("describe index"):
                return str(self.client.describe_index(collection, "vector").get("index_type") or "") or None
        except TransientError:
            return None

    def forget_collections(self) -> None:
        """Forget which collections were made and loaded: a collection found missing (dropped by
        hand, a Milvus restored from an older backup) is made again by the next :meth:`ensure_version`."""
        self._ready.clear()
        self._loaded.clear()

    def drop_version(self, names: VersionNames) -> None:
        """Drop a version's collections (never the serving one: the caller checks)."""
        with _wrap("drop collections"):
            for coll in (names.images, names.skus):
                self.client.drop_collection(coll)
        self._ready.discard(names.images)

    def serving_collection(self) -> str | None:
        """The images collection the serving alias points at, or None before anything was indexed."""
        with _wrap("describe alias"):
            if IMAGES_ALIAS not in set(self.client.list_aliases().get("aliases", [])):
                return None
            return str(self.client.describe_alias(IMAGES_ALIAS)["collection_name"])

    def alias_targets(self) -> dict[str, str]:
        """The serving aliases and the collections they point at."""
        out = {}
        with _wrap("describe aliases"):
            for alias in self.client.list_aliases().get("aliases", []):
                if alias in (IMAGES_ALIAS, SKUS_ALIAS):
                    out[alias] = str(self.client.describe_alias(alias)["collection_name"])
        return out

    # --- images --------------------------------------------------------------------------------

    def upsert_images(self, names: VersionNames, entities: Sequence[ImageEntity], *, timeout: float | None = None) -> None:
        """Upsert image entities. ``timeout``: seconds for the call and pymilvus' retries of it
        (without one, a server that stops answering holds the caller as long as pymilvus retries)."""
        if not entities:
            return
        rows = [
            {
                "image_id": e.image_id,
                "sku": e.sku[:SKU_MAX],
                "uri": e.uri[:URI_MAX],
                "vector": np.asarray(e.vector, dtype=np.float32).tolist(),
                "content_hash": e.content_hash,
                "model_id": e.model_id,
                "indexed_at": int(e.indexed_at),
            }
            for e in entities
        ]
        with _wrap("upsert images"):
            self.client.upsert(names.images, rows, timeout=timeout)

    def image_vectors(self, collection: str, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors by primary key (no filter scan)."""
        out: dict[str, np.ndarray] = {}
        ids = list(image_ids)
        with _wrap("get images"):
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                for r in self._read(
                    collection,
                    lambda c: c.get(collection, ids=chunk, output_fields=["vector"], consistency_level=CONSISTENCY),
                ):
                    out[r["image_id"]] = np.asarray(r["vector"], dtype=np.float32)
        return out

    def get_images(self, collection: str, image_ids: Sequence[str]) -> list[dict]:
        fields = ["image_id", "sku", "uri", "vector", "content_hash", "model_id", "indexed_at"]
        with _wrap("get images"):
            return list(
                self._read(
                    collection,
                    lambda c: c.get(collection, ids=list(image_ids), output_fields=fields, consistency_level=CONSISTENCY),
                )
            )

    def delete_images(self, collection: str, image_ids: Sequence[str]) -> None:
        if image_ids:
            with _wrap("delete images"):
                self.client.delete(collection, ids=list(image_ids))

    # --- SKUs ----------------------------------------------------------------------------------

    def upsert_sku(self, names: VersionNames, sku: str, vector: np.ndarray, image_count: int) -> None:
        self.upsert_skus(names, [(sku, vector, image_count)])

    def upsert_skus(self, names: VersionNames, rows: Sequence[tuple[str, np.ndarray, int]]) -> None:
        """Write many SKU vectors in one call per 500: ``(sku, vector, image_count)``."""
        entities = [
            {
                "sku": sku[:SKU_MAX],
                "vector": np.asarray(vector, dtype=np.float32).tolist(),
                "image_count": int(image_count),
                "model_id": names.model_id,
            }
            for sku, vector, image_count in rows
        ]
        with _wrap("upsert sku"):
            for i in range(0, len(entities), 500):
                self.client.upsert(names.skus, entities[i : i + 500])

    def delete_sku(self, names: VersionNames, sku: str) -> None:
        self.delete_skus(names, [sku])

    def delete_skus(self, names: VersionNames, sku_ids: Sequence[str]) -> None:
        if sku_ids:
            with _wrap("delete sku"):
                self.client.delete(names.skus, ids=[s[:SKU_MAX] for s in sku_ids])

    def get_skus(self, collection: str, sku_ids: Sequence[str]) -> list[dict]:
        fields = ["sku", "vector", "image_count", "model_id"]
        with _wrap("get skus"):
            return list(
                self._read(
                    collection,
                    lambda c: c.get(collection, ids=list(sku_ids), output_fields=fields, consistency_level=CONSISTENCY),
                )
            )

    # --- search --------------------------------------------------------------------------------

    def search(
        self, vector: np.ndarray, *, limit: int = 10, skus: bool = False, collection: str | None = None
    ) -> list[dict]:
        """Nearest neighbours in ``collection`` (default: through the serving alias); each hit has its
        fields and ``score``."""
        coll = collection or (SKUS_ALIAS if skus else IMAGES_ALIAS)
        fields = ["sku", "image_count"] if skus else ["image_id", "sku", "uri"]
        with _wrap("search"):
            res = self._read(
                coll,
                lambda c: c.search(
                    coll,
                    data=[np.asarray(vector, dtype=np.float32).tolist()],
                    limit=limit,
                    output_fields=fields,
                    search_params={"metric_type": "COSINE", "params": self._search_params},
                    consistency_level=CONSISTENCY,
                ),
            )
        hits = []
        for h in res[0]:
            entity = dict(h.get("entity", {}))
            pk = "sku" if skus else "image_id"
            entity.setdefault(pk, h.get(pk, h.get("id")))
            entity["score"] = float(h["distance"])
            hits.append(entity)
        return hits

    def count(self, collection: str) -> int:
        with _wrap("count"):
            res = self._read(
                collection,
                lambda c: c.query(collection, filter="", output_fields=["count(*)"], consistency_level=CONSISTENCY),
            )
        return int(res[0]["count(*)"]) if res else 0

    def rows(self, collection: str, fields: list[str], page: int = 1000) -> Iterator[dict]:
        """Every row of ``collection`` with ``fields``, a page at a time (a query iterator)."""
        with _wrap("query"):
            it = self._read(
                collection, lambda c: c.query_iterator(collection, batch_size=page, filter="", output_fields=fields)
            )
        try:
            while True:
                with _wrap("query"):
                    batch = it.next()
                if not batch:
                    return
                yield from batch
        finally:
            it.close()

    def _read(self, collection: str, call: Callable[[Any], T]) -> T:
        """``call(client)`` on a loaded ``collection`` (or alias). A collection comes back released
        after a server restart, and a command that starts its own embedded server finds every
        collection released: it is loaded (once per store) before the first read, and again when a
        read finds it released."""
        c = self.client
        if collection not in self._loaded:
            c.load_collection(collection)
            self._loaded.add(collection)
        try:
            return call(c)
        except Exception as exc:
            if not _not_loaded(exc):
                raise
            log.info("Milvus collection %s was released: loading it again", collection)
            c.load_collection(collection)
            return call(c)

    def flush(self) -> None:
        """Persist everything written so far (the Milvus Lite server loses unflushed rows when several
        writers were active and it is stopped)."""
        with _wrap("flush"):
            for coll in self.client.list_collections():
                if coll.startswith((IMAGES_ALIAS, SKUS_ALIAS)):
                    self.client.flush(coll)

    # --- schema --------------------------------------------------------------------------------

    @staticmethod
    def _image_schema(dim: int):  # type: ignore[no-untyped-def]
        from pymilvus import DataType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("image_id", DataType.VARCHAR, is_primary=True, max_length=64)
        s.add_field("sku", DataType.VARCHAR, max_length=SKU_MAX * 4)
        s.add_field("uri", DataType.VARCHAR, max_length=URI_MAX * 4)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        s.add_field("content_hash", DataType.VARCHAR, max_length=64)
        s.add_field("model_id", DataType.VARCHAR, max_length=256)
        s.add_field("indexed_at", DataType.INT64)
        return s

    @staticmethod
    def _sku_schema(dim: int):  # type: ignore[no-untyped-def]
        from pymilvus import DataType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("sku", DataType.VARCHAR, is_primary=True, max_length=SKU_MAX * 4)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        s.add_field("image_count", DataType.INT64)
        s.add_field("model_id", DataType.VARCHAR, max_length=256)
        return s

    def _index_params(self):  # type: ignore[no-untyped-def]
        ip = self.client.prepare_index_params()
        ip.add_index("vector", index_type=self._index_type, metric_type="COSINE", params=self._index_params_extra)
        return ip


def store_for(settings, uri: str, *, timeout: float = 30.0) -> MilvusStore:  # type: ignore[no-untyped-def]
    """A store with the index and search settings of ``settings`` (IMGSYNC_MILVUS_*)."""
    return MilvusStore(
        uri,
        settings.milvus_token,
        timeout=timeout,
        index_type=settings.milvus_index_type,
        index_params=settings.milvus_index_params,
        search_params=settings.milvus_search_params,
    )


#: pymilvus error code of a read on a released collection (``call load() before search/get/query``)
_NOT_LOADED = 101


def _not_loaded(exc: Exception) -> bool:
    return getattr(exc, "code", None) == _NOT_LOADED or "call load()" in str(exc)


#: pymilvus error code of a call naming a collection or alias that does not exist
_MISSING = 100


class CollectionMissing(TransientError):
    """Milvus answered, but a collection the call named does not exist (dropped by hand, a Milvus
    restored from an older backup): the caller forgets what it knew of the collections
    (:meth:`MilvusStore.forget_collections`), and the retry makes the collection again."""


class _wrap:
    """Turn pymilvus/grpc failures into :class:`TransientError` (``index_unavailable``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = time.monotonic()

    def __enter__(self) -> _wrap:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:  # type: ignore[no-untyped-def]
        if exc is None or isinstance(exc, (TransientError, ServiceUnavailable)):
            return False
        if isinstance(exc, Exception) and getattr(exc, "code", None) == _MISSING and "does not exist" in str(exc):
            raise CollectionMissing(Reason.index_unavailable, f"Milvus {self.what} failed: {getattr(exc, 'message', exc)}") from exc
        if isinstance(exc, Exception):
            raise TransientError(Reason.index_unavailable, f"Milvus {self.what} failed: {exc}") from exc
        return False
