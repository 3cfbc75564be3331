"""imgsync_events_total's source label comes from a small fixed set, whatever a producer names itself."""

from __future__ import annotations

from worker.pipeline import EVENT_SOURCES, event_source_label
from worker.sources import folder, outbox


def test_imgsync_sources_keep_their_name_and_others_count_as_other() -> None:
    """Each of imgsync's own sources is its own label value; any other name is `other`."""
    for name in (folder.SOURCE, outbox.SOURCE, "sqs", "webhook", "cli", "reindex", "redrive", "replay", "repair"):
        assert name in EVENT_SOURCES and event_source_label(name) == name
    assert {event_source_label(f"producer-{i}") for i in range(100)} == {"other"}
