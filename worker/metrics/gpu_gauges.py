"""The encode worker's GPU gauges, refreshed on a timer as well as after each batch: an idle GPU
must read idle, not keep its last busy reading."""

from __future__ import annotations

import logging

from celery import bootsteps

from worker.metrics import Metrics, metrics
from worker.metrics.collectors import gpu_memory_snapshot, nvml_snapshot

__all__ = ["GpuGauges", "SAMPLE_SECONDS", "record_gpu_memory"]

log = logging.getLogger(__name__)

#: seconds between two readings of the GPU gauges (memory from torch, utilisation from NVML)
SAMPLE_SECONDS = 5.0


class GpuGauges(bootsteps.StartStopStep):
    """Consumer step of the encode worker: sets the GPU memory and utilisation gauges every
    :data:`SAMPLE_SECONDS` (nothing without CUDA)."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(parent, **kwargs)
        self.tref = None

    def start(self, c) -> None:  # type: ignore[no-untyped-def]
        self.tref = c.timer.call_repeatedly(SAMPLE_SECONDS, self.sample, (), priority=20)

    def sample(self) -> None:
        try:
            record_gpu_memory(metrics())
        except Exception:  # noqa: BLE001 - a timer callback must never take the worker down
            log.warning("reading the GPU gauges failed", exc_info=True)

    def stop(self, c) -> None:  # type: ignore[no-untyped-def]
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


def record_gpu_memory(m: Metrics) -> None:
    """Set the GPU memory gauges from torch (nothing without CUDA)."""
    snapshot = gpu_memory_snapshot()
    for device, kinds in snapshot.items():
        for kind, value in kinds.items():
            m.gpu_memory.labels(device, kind).set(value)
    if snapshot:  # NVML only where torch sees a GPU
        for device, reading in nvml_snapshot().items():
            m.gpu_utilization.labels(device).set(reading["utilization"])
            m.gpu_temperature.labels(device).set(reading["temperature"])
