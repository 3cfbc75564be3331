"""What every source shares: publishing events to the preprocess queue."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from config.settings import Settings
from schemas.events import ImageEvent
from schemas.tasks import PreprocessPayload

__all__ = ["publish_events"]

log = logging.getLogger(__name__)


def publish_events(settings: Settings, events: Sequence[ImageEvent]) -> str:
    """Publish preprocess tasks for ``events`` (JSON, over one broker connection).

    Returns the request id that tags them in the ledger. Raises when the broker refuses: a source
    acknowledges its own message only after this returned.
    """
    from worker.celery_app import configure, dispatcher

    request_id = uuid.uuid4().hex
    if not events:
        return request_id
    configure(settings)
    dispatcher().preprocess_many([PreprocessPayload(event=ev, request_id=request_id) for ev in events])
    return request_id
