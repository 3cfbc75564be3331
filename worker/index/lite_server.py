"""The embedded Milvus: a Milvus Lite *server* child process (a ``.db`` file cannot be shared by two
processes, a server can), found by every process through a state file next to its data."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from worker.errors import ServiceUnavailable
from worker.procs import die_with_parent, pid_alive, start_time

__all__ = ["LiteServer", "running_server_uri", "free_port"]

log = logging.getLogger(__name__)

STATE_FILE = "server.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PortTaken(Exception):
    """The chosen port was taken by another program before the server could bind it."""


def listening_pid_owns(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds the socket listening on TCP ``port`` (Linux ``/proc``); None
    when that cannot be told (no ``/proc``, or the process's descriptors cannot be read)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])  # state 0A: LISTEN
    if not inodes:
        return None
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def running_server_uri(data_dir: Path) -> str | None:
    """The URI of the embedded server serving ``data_dir``, if one is running."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    pid = int(state.get("pid", -1))
    started = state.get("started")
    if started is not None and start_time(pid) not in (started, None):
        return None  # that pid belongs to another process now: the server is gone
    if pid_alive(pid) and _port_open(int(state["port"])):
        return str(state["uri"])
    return None


class LiteServer:
    """Start/stop a ``milvus_lite server`` for ``data_dir`` on 127.0.0.1."""

    #: seconds to wait for the server to answer after start
    start_timeout = 60.0
    #: seconds to wait for a clean exit after SIGTERM before SIGKILL
    stop_timeout = 30.0
    #: ports tried when the one chosen is taken before the server binds it
    port_attempts = 3

    def __init__(self, data_dir: Path, port: int = 0, *, log_file: Path | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.log_file = log_file or data_dir.parent / "milvus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start the server and wait until it answers; returns its URI.

        A port chosen here (``port=0``) can be taken by another program before the server binds it;
        the server then exits, or that program answers in its place. Either way another free port
        is tried (:attr:`port_attempts` in all). A port given by the caller is not replaced.

        Raises:
            ServiceUnavailable: another server already serves ``data_dir``, or it did not start.
        """
        other = running_server_uri(self.data_dir)
        if other:
            raise ServiceUnavailable(
                "Milvus Lite", "IMGSYNC_HOME", str(self.data_dir), f"already served at {other} by another process"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        chosen_here = not self.port
        if not chosen_here and _port_open(self.port):
            raise ServiceUnavailable(
                "Milvus Lite", "IMGSYNC_HOME", str(self.data_dir), f"port {self.port}: another program listens on it"
            )
        taken: _PortTaken | None = None
        for _ in range(self.port_attempts if chosen_here else 1):
            if chosen_here:
                self.port = free_port()
            try:
                return self._start_on_port()
            except _PortTaken as exc:
                taken = exc
                log.warning("Milvus Lite port %d was taken (%s)", self.port, exc)
        raise ServiceUnavailable("Milvus Lite", "IMGSYNC_HOME", str(self.data_dir), f"port {self.port}: {taken}")

    def _start_on_port(self) -> str:
        cmd = [
            sys.executable, "-m", "milvus_lite", "server",
            "--data-dir", str(self.data_dir / "data"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-workers", "1",  # one writer thread: no loss of unflushed rows on stop
        ]  # fmt: skip
        logf = self.log_file.open("ab")
        self.proc = subprocess.Popen(  # ends with this process, also when it is killed outright
            cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent()
        )
        logf.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                if _port_open(self.port):  # it could not bind: another program has the port
                    raise _PortTaken(f"the server exited with {code}: the port is in use")
                raise ServiceUnavailable(
                    "Milvus Lite", "IMGSYNC_HOME", str(self.data_dir), f"server exited with {code}; see {self.log_file}"
                )
            if _port_open(self.port):
                if listening_pid_owns(self.proc.pid, self.port) is False:  # another program answers there
                    self.stop()
                    raise _PortTaken("another program answers on it")
                (self.data_dir / STATE_FILE).write_text(
                    json.dumps({"pid": self.proc.pid, "started": start_time(self.proc.pid), "port": self.port, "uri": self.uri})
                )
                log.info("Milvus Lite server on %s (data %s)", self.uri, self.data_dir)
                return self.uri
            time.sleep(0.1)
        self.stop()
        raise ServiceUnavailable(
            "Milvus Lite", "IMGSYNC_HOME", str(self.data_dir), f"no answer within {self.start_timeout}s"
        )

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL; removes the state file."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("Milvus Lite server did not stop in %ss: killing it", self.stop_timeout)
                self.proc.kill()
                self.proc.wait()
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        self.proc = None

    def __enter__(self) -> LiteServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
