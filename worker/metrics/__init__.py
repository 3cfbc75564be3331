"""Prometheus metrics (prefix ``imgsync_``), correct under Celery prefork.

Metric objects are built on first use (``metrics()``), after the entry point chose the mode: a
worker node calls :func:`enable_multiprocess` before its pool forks, so every child writes its samples
to one directory and the node's single exporter (:func:`start_exporter`) merges them. Labels come
only from small fixed sets: stage, outcome, reason, queue, source, action, state, task, kind,
device, model_id, version (and ``pid`` on ``liveall`` gauges, added by the multiprocess mode).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Metrics",
    "metrics",
    "enable_multiprocess",
    "start_exporter",
    "mark_process_dead",
    "declare_worker_series",
    "LATENCY_BUCKETS",
    "BATCH_BUCKETS",
    "LAG_BUCKETS",
]

#: seconds: fetch/decode/encode/upsert/refresh latencies
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: images per encode batch
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: seconds from the event to the vector written
LAG_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

_lock = threading.Lock()
_metrics: Metrics | None = None
_multiprocess_dir: Path | None = None


@dataclass(frozen=True)
class Metrics:
    events: Any  #: Counter imgsync_events_total{source, action}
    images: Any  #: Counter imgsync_images_total{stage, outcome}
    failures: Any  #: Counter imgsync_failures_total{reason}
    retries: Any  #: Counter imgsync_retries_total{reason}
    dead_letters: Any  #: Counter imgsync_dead_letters_total{task}
    redriven: Any  #: Counter imgsync_redriven_total{kind} (image, sku): stalled work sent again
    stage_seconds: Any  #: Histogram imgsync_stage_seconds{stage}
    batch_size: Any  #: Histogram imgsync_encode_batch_size{model_id}
    lag_seconds: Any  #: Histogram imgsync_index_lag_seconds{model_id}
    gpu_memory: Any  #: Gauge imgsync_gpu_memory_bytes{device, kind}
    gpu_utilization: Any  #: Gauge imgsync_gpu_utilization_ratio{device} (NVML)
    gpu_temperature: Any  #: Gauge imgsync_gpu_temperature_celsius{device} (NVML)
    build_info: Any  #: Gauge imgsync_build_info{version, model_id}
    encode_paused: Any  #: Gauge imgsync_encode_paused (1 while back-pressure holds the encode consumer)


def metrics() -> Metrics:
    """The process's metric objects (built once, in the mode chosen before)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                from prometheus_client import Counter, Gauge, Histogram

                _metrics = Metrics(
                    events=Counter("imgsync_events", "Image events received", ["source", "action"]),
                    images=Counter("imgsync_images", "Images through a stage, by outcome", ["stage", "outcome"]),
                    failures=Counter("imgsync_failures", "Images failed, by reason code", ["reason"]),
                    retries=Counter(
                        "imgsync_retries", "Transient faults retried with backoff, by reason code", ["reason"]
                    ),
                    dead_letters=Counter("imgsync_dead_letters", "Malformed messages set aside", ["task"]),
                    redriven=Counter(
                        "imgsync_redriven", "Stalled work sent again (its broker message was lost)", ["kind"]
                    ),
                    stage_seconds=Histogram(
                        "imgsync_stage_seconds", "Latency of a pipeline step", ["stage"], buckets=LATENCY_BUCKETS
                    ),
                    batch_size=Histogram(
                        "imgsync_encode_batch_size", "Images per encode batch", ["model_id"], buckets=BATCH_BUCKETS
                    ),
                    lag_seconds=Histogram(
                        "imgsync_index_lag_seconds", "Event time to vector written", ["model_id"], buckets=LAG_BUCKETS
                    ),
                    gpu_memory=Gauge(
                        "imgsync_gpu_memory_bytes", "GPU memory by kind", ["device", "kind"], multiprocess_mode="liveall"
                    ),
                    gpu_utilization=Gauge(
                        "imgsync_gpu_utilization_ratio", "GPU busy ratio (NVML)", ["device"], multiprocess_mode="liveall"
                    ),
                    gpu_temperature=Gauge(
                        "imgsync_gpu_temperature_celsius", "GPU temperature (NVML)", ["device"], multiprocess_mode="liveall"
                    ),
                    build_info=Gauge(
                        "imgsync_build_info", "Worker build", ["version", "model_id"], multiprocess_mode="liveall"
                    ),
                    encode_paused=Gauge(
                        "imgsync_encode_paused",
                        "1 while an encode worker stopped consuming because Milvus or its device failed",
                        multiprocess_mode="livemax",
                    ),
                )
    return _metrics


#: ``imgsync_images_total`` stage labels and their outcomes (what the tasks count), by the stage
#: whose worker counts them: the encode worker also counts the JPEGs it decodes (IMGSYNC_JPEG_DECODE)
STAGE_OUTCOMES = {
    "preprocess": {"preprocess": ("queued", "unchanged", "stale", "deleted", "retried", "failed")},
    "encode": {
        "encode": ("indexed", "skipped", "retried", "failed", "requeued"),
        "device_decode": ("decoded", "fallback"),
    },
    "sku": {"sku": ("written", "deleted", "clean")},
}
#: ``imgsync_stage_seconds`` steps by stage
STAGE_STEPS = {"preprocess": ("fetch", "decode"), "encode": ("encode", "upsert", "device_decode"), "sku": ("sku_refresh",)}


def declare_worker_series(stages: Sequence[str], model_ids: Sequence[str] = ()) -> None:
    """Create a worker's labelled series at 0 for the ``stages`` it runs (preprocess, encode, sku)
    and the model versions it writes: a scrape of a fresh worker shows every family, and rate()
    and the alert rules see 0 rather than nothing before the first image, failure or retry."""
    from schemas.reasons import NAMED_AFTER_RETRIES, PERMANENT_REASONS, Reason
    from worker.dispatch import TASK_ENCODE, TASK_PREPROCESS, TASK_PREPROCESS_BATCH, TASK_REFRESH_SKU
    from worker.pipeline import EVENT_SOURCES

    m = metrics()
    tasks = {"preprocess": (TASK_PREPROCESS, TASK_PREPROCESS_BATCH), "encode": (TASK_ENCODE,), "sku": (TASK_REFRESH_SKU,)}
    for stage in stages:
        for label, outcomes in STAGE_OUTCOMES.get(stage, {}).items():
            for outcome in outcomes:
                m.images.labels(label, outcome)
        for step in STAGE_STEPS.get(stage, ()):
            m.stage_seconds.labels(step)
        for task in tasks.get(stage, ()):
            m.dead_letters.labels(task)
    if "preprocess" in stages:
        for source in sorted(EVENT_SOURCES):
            for action in ("upsert", "delete"):
                m.events.labels(source, action)
    if {"preprocess", "encode"} & set(stages):
        for reason in sorted(PERMANENT_REASONS | NAMED_AFTER_RETRIES):
            m.failures.labels(str(reason))
        for reason in sorted(set(Reason) - PERMANENT_REASONS):
            m.retries.labels(str(reason))
    for model_id in model_ids:
        m.batch_size.labels(model_id)
        m.lag_seconds.labels(model_id)


def enable_multiprocess(directory: Path, *, wipe: bool) -> None:
    """Choose prometheus-client's multiprocess mode for this process and its children.

    Must run before the first metric is built. ``wipe`` empties the directory (a node's start).
    """
    global _multiprocess_dir
    if wipe and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # prometheus-client reads its mode from this variable when the first metric is built
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    _multiprocess_dir = directory


def check_metrics_port(port: int) -> None:
    """Refuse a port another program listens on before a stack is started for nothing.

    Raises:
        ConfigError: naming IMGSYNC_METRICS_PORT.
    """
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the exporter binds it
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            raise _port_error(port, exc) from exc


def _port_error(port: int, exc: OSError) -> Exception:
    from worker.errors import ConfigError

    return ConfigError(f"IMGSYNC_METRICS_PORT={port}: cannot listen ({exc.strerror}); choose another port or 0")


def start_exporter(port: int, *, extra: list[Any] | None = None) -> Any:
    """Serve ``/metrics`` on ``port``: every process's samples (multiprocess mode) plus ``extra``
    collectors (ledger and queue gauges read at scrape time). Returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if _multiprocess_dir is not None:
        MultiProcessCollector(registry, path=str(_multiprocess_dir))
    else:  # single process: this process's own metrics
        from prometheus_client import REGISTRY

        registry = REGISTRY
    for collector in extra or []:
        registry.register(collector)
    try:
        server, _thread = start_http_server(port, addr="0.0.0.0", registry=registry)
    except OSError as exc:
        raise _port_error(port, exc) from exc
    return server


def mark_process_dead(pid: int) -> None:
    """Drop a dead child's live gauges (multiprocess mode only)."""
    if _multiprocess_dir is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path=str(_multiprocess_dir))
