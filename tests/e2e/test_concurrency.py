"""The index stays exact under concurrency: worker processes (prefork, two nodes) on Redis + PostgreSQL
add, replace and delete images of the same few SKUs in random order, with duplicates; once the queues
drain every SKU vector is the normalized mean of its current images, ``image_count`` matches the
ledger, and no deleted image is left in Milvus."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

from schemas.events import Action, ImageEvent
from tests.helpers import photo
from tests.stack import running_stack
from worker.encoders.base import l2_normalize
from worker.index import IMAGES_ALIAS, SKUS_ALIAS, MilvusStore
from worker.ledger import ImageState, Ledger, make_engine
from worker.sources.common import publish_events

pytestmark = pytest.mark.e2e

SKUS = ["S-1", "S-2", "S-3"]


def test_random_adds_replaces_deletes_converge(tmp_path: Path, pg_database) -> None:
    rng = random.Random(7)
    root = tmp_path / "catalog"
    files = [root / rng.choice(SKUS) / f"{i}.jpg" for i in range(24)]
    with running_stack(tmp_path / "stack", "production", pg_database=pg_database) as st:
        ledger = Ledger(make_engine(st.settings.effective_database_url))
        deleted: set[str] = set()
        seed = 0
        published: set[str] = set()
        for _round in range(4):  # each round: a burst of mixed events, published at once
            events: list[ImageEvent] = []
            for path in rng.sample(files, 12):
                seed += 1
                if path.exists() and rng.random() < 0.35:
                    path.unlink()
                    ev = ImageEvent(uri=str(path), sku=path.parent.name, action=Action.delete, source="test")
                    deleted.add(ev.image_id)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    photo(120 + seed % 50, 100, seed=seed).save(path, quality=90)  # add or replace
                    ev = ImageEvent(uri=str(path), sku=path.parent.name, source="test")
                    deleted.discard(ev.image_id)
                events.append(ev)
            events += rng.sample(events, 4)  # duplicates
            rng.shuffle(events)
            publish_events(st.settings, events)
            published.update(ev.image_id for ev in events)
            time.sleep(0.3)
        _settle(ledger, published)

        store = MilvusStore(st.uri)
        present = {f for f in files if f.exists()}
        for sku in SKUS:
            members = ledger.sku_members(sku, ledger.serving_version().model_id)
            expected = sorted(ImageEvent(uri=str(f), sku=sku).image_id for f in present if f.parent.name == sku)
            assert members == expected, sku
            rows = store.get_skus(SKUS_ALIAS, [sku])
            if not expected:
                assert rows == []
                continue
            vecs = store.image_vectors(IMAGES_ALIAS, expected)
            assert sorted(vecs) == expected
            mean = l2_normalize(np.mean(np.stack([vecs[i] for i in expected]), axis=0))
            assert rows[0]["image_count"] == len(expected)
            assert np.allclose(np.asarray(rows[0]["vector"]), mean, atol=1e-5)
        assert store.image_vectors(IMAGES_ALIAS, sorted(deleted)) == {}
        store.close()
        ledger.engine.dispose()


def _settle(ledger: Ledger, published: set[str], timeout: float = 240) -> None:
    """Wait until every published image has a ledger row, none is pending and no SKU awaits a
    refresh, twice in a row."""
    deadline, quiet = time.monotonic() + timeout, 0
    while quiet < 2:
        assert time.monotonic() < deadline, f"did not settle: {ledger.counts()}, skus {ledger.sku_counts()}"
        known = {r.image_id for r in ledger.select(states=ImageState.ALL)}
        busy = ledger.counts()["pending"] or ledger.sku_counts()[1] or not published <= known
        quiet = 0 if busy else quiet + 1
        time.sleep(1.0)
