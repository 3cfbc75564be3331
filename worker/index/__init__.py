"""The vector index: Milvus store and the embedded Milvus Lite server."""

from worker.index.lite_server import LiteServer, running_server_uri
from worker.index.milvus_store import IMAGES_ALIAS, SKUS_ALIAS, CollectionMissing, ImageEntity, MilvusStore, version_names

__all__ = [
    "IMAGES_ALIAS",
    "SKUS_ALIAS",
    "CollectionMissing",
    "ImageEntity",
    "LiteServer",
    "MilvusStore",
    "running_server_uri",
    "version_names",
]
