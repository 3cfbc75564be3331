"""The embedded stack: a Milvus Lite server and the Celery workers, as child processes."""

from __future__ import annotations

import contextlib
import fcntl
import json
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
from worker.errors import ConfigError
from worker.index import LiteServer, MilvusStore
from worker.procs import die_with_parent, start_time

__all__ = ["EmbeddedStack", "worker_command"]

log = logging.getLogger(__name__)

#: the file under IMGSYNC_HOME that the running stack holds locked; it names the stack's processes
LOCK_FILE = "stack.lock"


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
    _log_starts: dict[str, int] = field(default_factory=dict)  # worker name -> its log's size at spawn
    log_dir: Path | None = None
    #: the children's environment (set by start())
    env: dict[str, str] = field(default_factory=dict)
    #: the open, locked ``stack.lock`` while the stack runs
    lock: int | None = None

    @property
    def metrics_dir(self) -> Path:
        """Where every stack process writes its Prometheus samples."""
        return self.settings.metrics_dir or self.settings.home / "metrics" / "stack"

    def start(self) -> str:
        """Start everything; returns the Milvus URI the workers use."""
        home = self.settings.home
        home.mkdir(parents=True, exist_ok=True)
        self._lock_home()
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> str:
        home = self.settings.home
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
        self._record()
        return uri

    def _lock_home(self) -> None:
        """Take ``IMGSYNC_HOME/stack.lock`` (the kernel drops it when this process ends, however it
        ends), and stop what a previous stack killed outright left running.

        Raises:
            ConfigError: another ``imgsync up`` or ``demo`` runs on this IMGSYNC_HOME.
        """
        path = self.settings.home / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd).get("pid", "?")
            os.close(fd)
            raise ConfigError(
                f"IMGSYNC_HOME {self.settings.home} is in use by another `imgsync up` or `imgsync demo` "
                f"(pid {holder}): stop it first (Ctrl-C there), or set another IMGSYNC_HOME"
            ) from None
        self.lock = fd
        leftovers = [
            (int(pid), started) for pid, started in _read_lock(fd).get("children", []) if start_time(int(pid)) == started
        ]
        if leftovers:  # a stack whose `up` was killed outright (SIGKILL) before it could stop them
            log.warning("stopping %d process(es) left running by a stack that was killed", len(leftovers))
            _stop_groups([pid for pid, _ in leftovers], self.stop_timeout)
        self._record()

    def _record(self) -> None:
        """Write this process and its children into the lock file, for the next start to find."""
        if self.lock is None:
            return
        procs = [p.pid for p in self.workers]
        if self.server is not None and self.server.proc is not None:
            procs.insert(0, self.server.proc.pid)
        doc = {"pid": os.getpid(), "children": [[pid, start_time(pid)] for pid in procs]}
        os.ftruncate(self.lock, 0)
        os.pwrite(self.lock, json.dumps(doc).encode(), 0)

    def spawn(self, name: str, queues: str, concurrency: int | None) -> subprocess.Popen[bytes]:
        """Start one worker child of the running stack, logging to ``logs/worker-<name>.log``."""
        assert self.log_dir is not None, "start() the stack first"
        with (self.log_dir / f"worker-{name}.log").open("ab") as logf:
            self._log_starts[name] = logf.tell()  # the log is appended to: this run's part starts here
            return subprocess.Popen(
                worker_command(queues, concurrency=concurrency),
                env=self.env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # warm-stops if this process is killed outright
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

    def worker_error(self) -> tuple[int, str] | None:
        """``(exit status, message)`` of a worker that ended with exit status 2 (a configuration
        error it found at start, e.g. a model architecture that does not exist) or 3 (a service it
        needs is unreachable, e.g. IMGSYNC_MILVUS_URI), read from its log; else None."""
        logs = self.log_dir or self.settings.home / "logs"
        for name, p in zip(("cpu", "encode"), self.workers, strict=False):
            if (code := p.poll()) in (2, 3):
                try:
                    with (logs / f"worker-{name}.log").open("rb") as f:
                        f.seek(self._log_starts.get(name, 0))
                        lines = f.read().decode(errors="replace").splitlines()
                except OSError:
                    lines = []
                starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
                if not starts:
                    what = "a configuration error" if code == 2 else "a service it needs unreachable"
                    return code, f"the {name} worker found {what}; see {logs / f'worker-{name}.log'}"
                text = " ".join(" ".join(lines[starts[-1] :]).removeprefix("error:").split())  # the log wraps lines
                return code, text if len(text) <= 800 else text[:800] + f" … (see {logs / f'worker-{name}.log'})"
        return None

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
        if self.lock is not None:
            os.ftruncate(self.lock, 0)  # nothing left to stop
            os.close(self.lock)  # releases the lock
            self.lock = None

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_lock(fd: int) -> dict:  # type: ignore[type-arg]
    try:
        doc = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _stop_groups(pids: list[int], timeout: float) -> None:
    """SIGTERM the process groups led by ``pids`` (workers warm-stop, the server exits), SIGKILL what
    is still there after ``timeout`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(start_time(pid) is not None for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if start_time(pid) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def _status(code: int | None) -> str:
    if code is None:
        return "not started"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
