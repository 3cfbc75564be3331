"""Worker heartbeats in the ledger, so `imgsync status` can tell which nodes are alive on any broker."""

from __future__ import annotations

import logging
import os
import socket
import threading

from worker.ledger import Ledger

__all__ = ["Heartbeat", "HEARTBEAT_SECONDS", "STALE_AFTER_SECONDS"]

log = logging.getLogger(__name__)

#: seconds between heartbeats
HEARTBEAT_SECONDS = 15.0
#: a node not seen for this long counts as gone
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS


class Heartbeat:
    """A daemon thread in a worker node's main process writing ``last_seen`` every few seconds."""

    def __init__(self, ledger: Ledger, *, queues: str, model: str, interval: float = HEARTBEAT_SECONDS) -> None:
        self.ledger = ledger
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.queues, self.model, self.interval = queues, model, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgsync-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self.ledger.forget_worker(self.name)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.debug("could not remove heartbeat row", exc_info=True)

    def _beat(self) -> None:
        try:
            self.ledger.heartbeat(
                self.name, host=socket.gethostname(), pid=os.getpid(), queues=self.queues, model=self.model
            )
        except Exception:  # noqa: BLE001 - a missed beat is logged, never fatal to the worker
            log.warning("heartbeat failed", exc_info=True)
        finally:
            # the first beat runs before the pool forks: keep no connection a child would inherit
            self.ledger.engine.dispose()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()
