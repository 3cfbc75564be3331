"""The embedded stack: a Milvus Lite server and the Celery workers, as child processes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from config.settings import Settings
from worker.index import LiteServer, MilvusStore

__all__ = ["EmbeddedStack", "worker_command"]

log = logging.getLogger(__name__)


def worker_command(queues: str, *, concurrency: int | None = None) -> list[str]:
    """The command line of an ``imgsync worker`` child."""
    cmd = [sys.executable, "-m", "worker.cli", "worker", "--queues", queues]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    return cmd


@dataclass
class EmbeddedStack:
    """Milvus Lite server + a CPU worker (preprocess, sku) + an encode worker, under ``settings.home``."""

    settings: Settings
    #: seconds a worker gets to finish its batch after SIGTERM before it is killed
    stop_timeout: float = 60.0
    server: LiteServer | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_dir: Path | None = None
    #: the children's environment (set by start())
    env: dict[str, str] = field(default_factory=dict)

    @property
    def metrics_dir(self) -> Path:
        """Where every stack process writes its Prometheus samples."""
        return self.settings.metrics_dir or self.settings.home / "metrics" / "stack"

    def start(self) -> str:
        """Start everything; returns the Milvus URI the workers use."""
        home = self.settings.home
        home.mkdir(parents=True, exist_ok=True)
        if self.metrics_dir.exists():
            shutil.rmtree(self.metrics_dir)  # samples of a previous run would be added to this one's
        self.metrics_dir.mkdir(parents=True)
        self.log_dir = home / "logs"
        self.log_dir.mkdir(exist_ok=True)
        if self.settings.milvus_uri:
            uri = self.settings.milvus_uri
        else:
            self.server = LiteServer(self.settings.milvus_data_dir, log_file=self.log_dir / "milvus.log")
            uri = self.server.start()
        self.env = {
            **os.environ,
            **self.settings.as_env(),
            "IMGSYNC_MILVUS_URI": uri,
            # the children write their samples where `up` serves them; they run no exporter of their own
            "IMGSYNC_METRICS_DIR": str(self.metrics_dir),
            "IMGSYNC_METRICS_PORT": "0",
        }
        q = self.settings.queues
        cpu = self.settings.worker_concurrency or max(1, min(4, os.cpu_count() or 1))
        self.workers.append(self.spawn("cpu", f"{q.preprocess},{q.sku}", cpu))
        self.workers.append(self.spawn("encode", q.encode, None))
        return uri

    def spawn(self, name: str, queues: str, concurrency: int | None) -> subprocess.Popen[bytes]:
        """Start one worker child of the running stack, logging to ``logs/worker-<name>.log``."""
        assert self.log_dir is not None, "start() the stack first"
        with (self.log_dir / f"worker-{name}.log").open("ab") as logf:
            return subprocess.Popen(
                worker_command(queues, concurrency=concurrency),
                env=self.env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def exited(self) -> list[str]:
        """The stack processes that ended, each as ``name (pid P) exit status S, log FILE``."""
        gone: list[str] = []
        logs = self.log_dir or self.settings.home / "logs"
        if self.server is not None:
            code = None if self.server.proc is None else self.server.proc.poll()
            if self.server.proc is None or code is not None:
                pid = self.server.proc.pid if self.server.proc is not None else "-"
                gone.append(f"Milvus Lite server (pid {pid}) {_status(code)}, log {logs / 'milvus.log'}")
        for name, p in zip(("cpu", "encode"), self.workers, strict=False):
            code = p.poll()
            if code is not None:
                gone.append(f"{name} worker (pid {p.pid}) {_status(code)}, log {logs / f'worker-{name}.log'}")
        return gone

    def stop(self) -> None:
        """Warm-stop the workers (they finish or return their batch), flush Milvus, stop the server."""
        for p in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for p in self.workers:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in %ss: killing it", p.pid, self.stop_timeout)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.workers.clear()
        if self.server is not None:
            store = MilvusStore(self.server.uri)
            try:
                store.flush()
            except Exception:  # noqa: BLE001 - best effort; the server is stopped either way
                log.warning("Milvus flush before stop failed", exc_info=True)
            finally:
                store.close()
            self.server.stop()
            self.server = None

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _status(code: int | None) -> str:
    if code is None:
        return "not started"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
