"""What every source shares: publishing events to the preprocess queue."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from config.settings import Settings
from schemas.events import ImageEvent

if TYPE_CHECKING:
    from worker.ledger import Ledger

__all__ = ["publish_events"]

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _ledger(url: str) -> Ledger:
    """One ledger (engine and pool) per database for the life of a source process."""
    from worker.ledger import Ledger, make_engine

    return Ledger(make_engine(url))


def publish_events(settings: Settings, events: Sequence[ImageEvent]) -> str:
    """Record ``events`` in the ledger, then publish preprocess tasks for the current ones (JSON,
    over one broker connection); see :func:`worker.pipeline.submit`.

    Returns the request id that tags them in the ledger. Raises when the database or the broker
    refuses: a source acknowledges its own message only after this returned.
    """
    from worker.celery_app import configure, dispatcher
    from worker.pipeline import submit

    request_id = uuid.uuid4().hex
    if not events:
        return request_id
    configure(settings)
    submit(_ledger(settings.effective_database_url), dispatcher(), events, request_id)
    return request_id
