"""The SQL ledger: image and SKU state, schema upgrades."""

from worker.ledger.db import make_engine, upgrade
from worker.ledger.ledger import Acceptance, Accepted, Coverage, ImageRow, IndexedImage, KnownImage, Ledger, VersionRow
from worker.ledger.tables import ImageState, VersionStatus

__all__ = [
    "Acceptance",
    "Accepted",
    "Coverage",
    "ImageRow",
    "ImageState",
    "IndexedImage",
    "KnownImage",
    "Ledger",
    "VersionRow",
    "VersionStatus",
    "make_engine",
    "upgrade",
]
