"""The SQL ledger: image and SKU state, schema upgrades."""

from worker.ledger.db import make_engine, upgrade
from worker.ledger.ledger import Acceptance, ImageRow, IndexedImage, Ledger
from worker.ledger.tables import ImageState

__all__ = ["Acceptance", "ImageRow", "ImageState", "IndexedImage", "Ledger", "make_engine", "upgrade"]
