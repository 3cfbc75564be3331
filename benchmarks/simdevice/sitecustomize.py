"""A simulated GPU for ``bench_drain.py --device-ms``: NOT a real device, a stand-in for one on
machines without a GPU, so that what the encode worker does around an asynchronous forward pass
can be measured.

Imported at interpreter start-up by processes that have this folder on ``PYTHONPATH`` and
``IMGSYNC_BENCH_SIM_DEVICE_MS`` set (milliseconds of device time per image). The ``random``
control's ``encode_async`` then behaves as CUDA's does: it queues the batch on one "device"
thread (a stream: batches run one after another, in order) that sleeps for the batch's device
time without holding the GIL, and returns at once; ``result()`` waits for it. The device thread
adds up its busy seconds in ``IMGSYNC_BENCH_SIM_DEVICE_BUSY`` (a file) after every batch, from
which the benchmark reports the device's utilisation.
"""

from __future__ import annotations

import os

_MS = os.environ.get("IMGSYNC_BENCH_SIM_DEVICE_MS")

if _MS:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from worker.encoders.base import PendingVectors
    from worker.encoders.random_backend import RandomEncoder

    _device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-device")
    _busy = [0.0]
    _lock = threading.Lock()
    _out = os.environ.get("IMGSYNC_BENCH_SIM_DEVICE_BUSY")

    def _run(n: int) -> None:
        started = time.perf_counter()
        time.sleep(n * float(_MS) / 1000.0)
        with _lock:
            _busy[0] += time.perf_counter() - started
            if _out:
                with open(_out, "w") as f:
                    f.write(f"{_busy[0]:.6f}")

    class _Queued(PendingVectors):
        def __init__(self, vectors, job) -> None:  # type: ignore[no-untyped-def]
            super().__init__(vectors)
            self.on_device, self._job = True, job

        def result(self):  # type: ignore[no-untyped-def]
            self._job.result()
            return super().result()

    def encode_async(self, pixels):  # type: ignore[no-untyped-def]
        vectors = self.encode(pixels)  # the control's digest vectors (host work, small)
        return _Queued(vectors, _device.submit(_run, len(pixels)))

    RandomEncoder.encode_async = encode_async  # type: ignore[method-assign]
