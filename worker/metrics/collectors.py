"""Gauges read at scrape time from the source of truth: ledger totals by state, SKUs awaiting
refresh, and queue depths from the broker. A failing read is logged, never raised into the scrape."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from config.settings import Settings

__all__ = ["StateCollector", "gpu_memory_snapshot", "nvml_snapshot"]

log = logging.getLogger(__name__)


class StateCollector:
    """``imgsync_ledger_images{state}``, ``imgsync_skus_awaiting_refresh``, ``imgsync_oldest_waiting_seconds``,
    ``imgsync_queue_depth{queue}``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ledger = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        images = GaugeMetricFamily("imgsync_ledger_images", "Images in the ledger by state", labels=["state"])
        dirty = GaugeMetricFamily("imgsync_skus_awaiting_refresh", "SKUs whose aggregate vector is stale")
        waiting = GaugeMetricFamily(
            "imgsync_oldest_waiting_seconds", "Seconds the oldest image waiting to be processed has waited (0: none)"
        )
        try:
            if self._ledger is None:
                from worker.ledger import Ledger, make_engine

                self._ledger = Ledger(make_engine(self.settings.effective_database_url))
            for state, n in self._ledger.counts().items():
                images.add_metric([state], n)
            dirty.add_metric([], self._ledger.sku_counts()[1])
            waiting.add_metric([], self._ledger.oldest_waiting_seconds() or 0.0)
            yield images
            yield dirty
            yield waiting
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB hiccups
            log.warning("ledger gauges unavailable", exc_info=True)
        finally:
            if self._ledger is not None:  # no pooled connection for a forked child to inherit
                self._ledger.engine.dispose()
        depth = GaugeMetricFamily("imgsync_queue_depth", "Messages waiting per queue", labels=["queue"])
        try:
            from worker.status import queue_depths

            for queue, n in queue_depths(self.settings).items():
                if n is not None:
                    depth.add_metric([queue], n)
            yield depth
        except Exception:  # noqa: BLE001
            log.warning("queue depth unavailable", exc_info=True)


def gpu_memory_snapshot() -> dict[str, dict[str, int]]:
    """Per CUDA device: allocated, reserved, peak and total bytes (empty without CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return {}
    if not torch.cuda.is_available():
        return {}
    out = {}
    for i in range(torch.cuda.device_count()):
        out[f"cuda:{i}"] = {
            "allocated": int(torch.cuda.memory_allocated(i)),
            "reserved": int(torch.cuda.memory_reserved(i)),
            "peak": int(torch.cuda.max_memory_allocated(i)),
            "total": int(torch.cuda.get_device_properties(i).total_memory),
        }
    return out


_nvml_ready: bool | None = None  # None: not tried yet


def _nvml():  # type: ignore[no-untyped-def]
    """The NVML module, initialised once per process; None without a driver or the binding."""
    global _nvml_ready
    try:
        import pynvml
    except ImportError:
        return None
    if _nvml_ready is None:
        try:
            pynvml.nvmlInit()
            _nvml_ready = True
        except pynvml.NVMLError:  # no driver / no GPU (NVMLError_LibraryNotFound on a CPU machine)
            _nvml_ready = False
    return pynvml if _nvml_ready else None


def nvml_snapshot() -> dict[str, dict[str, float]]:
    """Per GPU: utilisation (0–1) and temperature (°C) from NVML; empty when NVML is absent.

    NVML comes with the NVIDIA driver; its Python binding is ``pip install nvidia-ml-py``.
    """
    pynvml = _nvml()
    if pynvml is None:
        return {}
    out = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            temp = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            out[f"cuda:{i}"] = {"utilization": util.gpu / 100.0, "temperature": float(temp)}
    except pynvml.NVMLError:
        log.debug("NVML read failed", exc_info=True)
    return out
