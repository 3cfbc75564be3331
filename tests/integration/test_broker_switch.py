"""One process publishing to one broker, then another, then the first again (the CLI in tests, a
source re-configured): every publish reaches its broker."""

from __future__ import annotations

import uuid

import redis

from schemas.events import ImageEvent
from tests.conftest import REDIS_URL
from worker.ledger import upgrade
from worker.sources.common import publish_events


def test_switching_brokers_back_and_forth_keeps_publishing(make_settings, tmp_path) -> None:
    queue = f"switch-{uuid.uuid4().hex[:8]}"
    on_redis = make_settings(broker_url=REDIS_URL, queue_preprocess=queue)
    embedded = make_settings(home=tmp_path / "other")
    events = [ImageEvent(uri=str(tmp_path / "S" / "1.jpg"), sku="S")]
    for settings in (on_redis, embedded):
        upgrade(settings.effective_database_url)  # sources record events in the ledger before publishing
    for settings in (on_redis, embedded, on_redis, embedded, on_redis):
        publish_events(settings, events)  # raised "Acquire on closed pool" on the way back
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.llen(queue) == 3
    finally:
        client.delete(queue)
