"""Back-pressure: with Milvus down, the encode worker stops taking messages (they wait in the Redis
queue) instead of burning retries, and resumes by itself when Milvus is back.

IMGSYNC_MAX_RETRIES=1 makes the point: without back-pressure every image would exhaust its single
retry within ~3 s of backoff and end `failed` (retries_exhausted) during the outage."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import REDIS_URL
from tests.stack import Stack, images_waiting, running_stack
from worker.index import IMAGES_ALIAS, MilvusStore
from worker.ledger import Ledger, make_engine

pytestmark = pytest.mark.e2e

N = 24


def paused_gauge(st: Stack) -> float | None:
    """imgsync_encode_paused as the encode worker (``st.procs[1]``) exports it; None: no series yet."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(st.settings.home / "metrics" / f"worker-{st.procs[1].pid}"))
    values = [s.value for f in registry.collect() for s in f.samples if s.name == "imgsync_encode_paused"]
    return max(values) if values else None


def wait_gauge(st: Stack, want: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while paused_gauge(st) != want:
        assert time.monotonic() < deadline, f"imgsync_encode_paused is {paused_gauge(st)}, not {want}"
        time.sleep(0.2)


def test_encode_pauses_while_milvus_is_down_and_resumes(tmp_path: Path, catalog, pg_database) -> None:
    root = catalog(n_skus=6, per_sku=4)
    env = {"IMGSYNC_MAX_RETRIES": "1", "IMGSYNC_HEALTH_PROBE_SECONDS": "0.5"}
    with running_stack(tmp_path / "stack", "production", pg_database=pg_database, extra_env=env) as st:
        ledger = Ledger(make_engine(st.settings.effective_database_url))
        broker = redis.Redis.from_url(REDIS_URL)
        encode_q = st.settings.queues.encode
        wait_gauge(st, 0)  # exported from the start, so that an alert tells "not paused" from "no data"
        st.server.proc.kill()  # Milvus dies before the images arrive
        st.server.proc.wait(30)
        proc = st.cli("index", str(root), "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]

        # every image is preprocessed and its encode message ends up waiting in the broker
        deadline = time.monotonic() + 120
        while images_waiting(broker, encode_q) < N:
            assert time.monotonic() < deadline, (images_waiting(broker, encode_q), ledger.counts())
            time.sleep(0.2)
        encode_log = (st.logs / "encode.log").read_text()
        assert "encode paused: index_unavailable" in encode_log
        assert paused_gauge(st) == 1
        time.sleep(6)  # far longer than the backoff of two attempts: nothing may fail meanwhile
        counts = ledger.counts()
        assert counts["failed"] == 0 and counts["indexed"] == 0 and counts["pending"] == N, counts
        assert images_waiting(broker, encode_q) == N  # held in the broker (maybe fewer messages), not retried

        st.server.start()  # same port and data
        deadline = time.monotonic() + 180
        while ledger.counts()["indexed"] < N:
            assert time.monotonic() < deadline, ledger.counts()
            assert ledger.counts()["failed"] == 0, ledger.failure_counts()
            time.sleep(0.5)
        assert "encode resumed after" in (st.logs / "encode.log").read_text()
        assert paused_gauge(st) == 0
        assert broker.llen(encode_q) == 0
        store = MilvusStore(st.uri)
        ids = [r.image_id for r in ledger.select()]
        assert sorted(store.image_vectors(IMAGES_ALIAS, ids)) == sorted(ids)
        store.close()
        broker.close()
        ledger.engine.dispose()
