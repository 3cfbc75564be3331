"""Metrics tell the truth: `imgsync up` (two prefork CPU children + the encode worker) serves one
exporter whose numbers match the ledger and what was indexed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.index.lite_server import free_port

pytestmark = pytest.mark.e2e


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def wait_for_exporter(up: subprocess.Popen, port: int, log: Path, timeout: float = 90) -> None:
    """Block until `imgsync up`'s exporter answers on ``port``; fail with up's log if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            scrape(port)
            return
        except OSError:
            assert up.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "exporter never answered"
            time.sleep(0.5)


def test_up_exporter_counts_match_ledger(tmp_path: Path, catalog) -> None:
    """After indexing 12 good and 2 bad images through `imgsync up`: indexed, failures by reason,
    batch sizes, lag observations, events and ledger gauges all agree with what happened."""
    root = catalog(n_skus=3, per_sku=4)
    (root / "SKU-1" / "bad.jpg").write_bytes(b"<html>nope</html>")
    (root / "SKU-2" / "empty.jpg").write_bytes(b"")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSYNC_")}
    env.update(
        IMGSYNC_HOME=str(tmp_path / "home"),
        IMGSYNC_MODEL="tiny",
        IMGSYNC_METRICS_PORT=str(port),
        IMGSYNC_WORKER_CONCURRENCY="2",
        IMGSYNC_BATCH_MAX="4",
        IMGSYNC_BATCH_WAIT_MS="100",
    )
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for_exporter(up, port, tmp_path / "up.log")
        # before anything is indexed: every family of the contract is there, at 0, once workers run
        deadline = time.monotonic() + 120
        s = scrape(port)
        while not {"imgsync_encode_batch_size_count", "imgsync_events_total"} <= {n for n, _ in s}:
            assert time.monotonic() < deadline and up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
            s = scrape(port)
        for name in ("imgsync_events_total", "imgsync_images_total", "imgsync_failures_total", "imgsync_retries_total",
                     "imgsync_dead_letters_total", "imgsync_stage_seconds_count", "imgsync_encode_batch_size_count",
                     "imgsync_index_lag_seconds_count"):  # fmt: skip
            assert any(n == name for n, _ in s) and total(s, name) == 0, name
        for reason in ("not_found", "fetch_timeout", "fetch_too_large", "forbidden_address", "unsupported_format",
                       "truncated", "decompression_bomb", "corrupt", "too_small", "retries_exhausted"):  # fmt: skip
            assert ("imgsync_failures_total", (("reason", reason),)) in s, reason
        for stage in ("fetch", "decode", "encode", "upsert", "device_decode", "sku_refresh"):
            assert ("imgsync_stage_seconds_count", (("stage", stage),)) in s, stage
        proc = subprocess.run(
            [sys.executable, "-m", "worker.cli", "index", str(root), "--wait", "--json", "--timeout", "180"],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        results = json.loads(proc.stdout)["results"]
        assert sum(r["outcome"] == "indexed" for r in results) == 12, (results, proc.stderr[-3000:], (tmp_path / "up.log").read_text()[-3000:])
        failures = json.loads(
            subprocess.run(
                [sys.executable, "-m", "worker.cli", "failures", "list", "--json"],
                env=env, capture_output=True, text=True, timeout=60,
            ).stdout
        )["by_reason"]  # fmt: skip
        assert failures == {"unsupported_format": 1, "corrupt": 1}

        status = json.loads(
            subprocess.run(
                [sys.executable, "-m", "worker.cli", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
            ).stdout
        )
        assert status["ready"] and status["failures_by_reason"] == failures
        assert sorted(w["queues"] for w in status["workers"]) == ["encode", "preprocess,sku"]
        assert status["indexed_last_5m"] == 12 and status["indexed_per_second_5m"] > 0
        assert status["ledger"]["indexed"] == 12 and set(status["aliases"]) == {"imgsync_images", "imgsync_skus"}

        s = scrape(port)
        assert total(s, "imgsync_images_total", stage="encode", outcome="indexed") == 12
        assert total(s, "imgsync_encode_batch_size_sum") == 12  # each good image encoded once
        assert 3 <= total(s, "imgsync_encode_batch_size_count") <= 12  # batches of at most 4
        assert total(s, "imgsync_index_lag_seconds_count") == 12
        assert total(s, "imgsync_events_total", source="cli", action="upsert") == 14
        for reason, n in failures.items():
            assert total(s, "imgsync_failures_total", reason=reason) == n
        assert total(s, "imgsync_images_total", stage="preprocess", outcome="failed") == 2
        assert total(s, "imgsync_ledger_images", state="indexed") == 12
        assert total(s, "imgsync_ledger_images", state="failed") == 2
        assert ("imgsync_queue_depth", (("queue", "encode"),)) in s
        assert total(s, "imgsync_build_info", model_id="tiny") >= 1
        assert total(s, "imgsync_stage_seconds_count", stage="fetch") >= 14
        assert not any(n == "imgsync_gpu_memory_bytes" for n, _ in s)  # no CUDA here: absent, no error
        # every metric the dashboard and the alert rules use is one the exporter emits
        gpu_only = {"imgsync_gpu_memory_bytes", "imgsync_gpu_utilization_ratio", "imgsync_gpu_temperature_celsius"}
        # the webhook's and the outbox relay's own (tests/sources/test_source_metrics.py); `up` runs the folder source
        other_sources = {"imgsync_webhook_requests_total", "imgsync_outbox_pending_rows", "imgsync_outbox_oldest_pending_seconds"}
        assert total(s, "imgsync_source_failures_total", source="folder") == 0
        assert total(s, "imgsync_source_last_success_timestamp_seconds", source="folder") > time.time() - 60
        emitted = {n for n, _ in s} | gpu_only | other_sources  # GPU gauges exist on CUDA workers only
        config = Path(__file__).resolve().parents[2] / "config"
        used = set()
        for f in [config / "prometheus/alerts.yml", config / "grafana/dashboards/imgsync.json"]:
            used |= set(re.findall(r"imgsync_[a-z_]+", f.read_text()))
        assert used and used <= emitted, used - emitted
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)  # with its workers: none may load the tests after this one
            raise
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]


def test_up_stops_on_sigint_also_when_started_as_a_background_job(tmp_path: Path) -> None:
    """`imgsync up &` from a script inherits SIGINT as ignored (and Python then installs no Ctrl-C
    handler): `kill -INT` must still stop it cleanly, workers included."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSYNC_")}
    env.update(IMGSYNC_HOME=str(tmp_path / "home"), IMGSYNC_MODEL="tiny", IMGSYNC_METRICS_PORT=str(port))
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_exporter(up, port, tmp_path / "up.log")
        up.send_signal(signal.SIGINT)
        assert up.wait(90) == 0, (tmp_path / "up.log").read_text()[-3000:]
        assert "stopping" in (tmp_path / "up.log").read_text()
        assert "RANDOM WEIGHTS" in (tmp_path / "up.log").read_text()  # the tiny model says so on the console
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        log.close()
    workers = subprocess.run(["pgrep", "-f", str(tmp_path / "home")], capture_output=True, text=True).stdout.split()
    assert workers == [], "stack processes outlived `up`"
