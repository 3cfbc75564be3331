"""The embedded stack loses nothing when its workers are SIGKILLed mid-run (OOM killer): the
embedded broker keeps each delivered message, hidden, until it is acknowledged, and shows again what
a dead process held. No `reindex`, no visibility timeout to wait for."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_production_pipeline import _assert_index_matches_ledger, wait_for, write_catalog
from tests.stack import running_stack
from worker.ledger import Ledger, make_engine
from worker.status import queue_depths

pytestmark = pytest.mark.e2e


def test_embedded_workers_sigkilled_mid_run_lose_nothing(tmp_path: Path) -> None:
    files = write_catalog(tmp_path / "catalog", n_skus=8, per_sku=12)
    env = {"IMGSYNC_BATCH_MAX": "4", "IMGSYNC_BATCH_WAIT_MS": "100"}
    with running_stack(tmp_path / "stack", "embedded", extra_env=env) as st:
        ledger = Ledger(make_engine(st.settings.effective_database_url))
        cpu, encode = st.procs
        assert st.cli("index", str(tmp_path / "catalog")).returncode == 0
        wait_for(lambda: ledger.counts()["indexed"] >= 1, "the first batch", every=0.01)
        st.kill(encode)  # it holds prefetched, unacknowledged encode messages
        st.kill(cpu)  # and the CPU worker its preprocess and SKU messages
        at_kill = ledger.counts()
        assert at_kill["indexed"] < len(files), "the kill came too late"
        depths = queue_depths(st.settings)
        st.start_worker("cpu-2", f"{st.settings.queues.preprocess},{st.settings.queues.sku}")
        st.start_worker("encode-2", st.settings.queues.encode)
        wait_for(lambda: ledger.counts()["indexed"] == len(files) and ledger.sku_counts()[1] == 0, "every image indexed")
        assert ledger.counts()["failed"] == 0 and ledger.counts()["pending"] == 0
        _assert_index_matches_ledger(st, ledger, expected=len(files))
        assert sum(queue_depths(st.settings).values()) == 0
        print(f"at kill: {at_kill}, waiting in the queues: {depths}")
        ledger.engine.dispose()
