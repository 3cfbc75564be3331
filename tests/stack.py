"""A running imgsync stack for end-to-end tests: a Milvus Lite server of its own and two real worker
processes (CPU queues: preprocess + sku; encode queue), on the embedded default (SQLite broker and
state) or production settings (Redis or RabbitMQ broker, PostgreSQL state)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings
from tests.conftest import RABBITMQ_URL, REDIS_URL
from worker.cli.stack import worker_command
from worker.index import LiteServer

__all__ = ["Stack", "running_stack", "MODES"]

MODES = ("embedded", "production", "rabbitmq")


@dataclass
class Stack:
    env: dict[str, str]  # IMGSYNC_* of the workers, for CLI subprocesses
    uri: str  # Milvus
    settings: Settings  # the same settings, for in-process clients
    logs: Path
    procs: list[subprocess.Popen]
    server: LiteServer  # the Milvus Lite server (tests kill and restart it)

    def __getitem__(self, key: str):  # dict-style access kept for older tests
        return getattr(self, key)

    def start_worker(self, name: str, queues: str, **env: str) -> subprocess.Popen:
        """Start one more worker (e.g. a replacement for a killed one), logging to ``logs/NAME.log``,
        with ``env`` on top of the stack's; it is stopped with the stack. Returns once it is ready."""
        proc = _start_worker(self.logs / f"{name}.log", queues, {**self.env, **env})
        self.procs.append(proc)
        _wait_ready(self.logs, [proc], names=[name])
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a worker and its pool children (its process group), as an OOM killer would."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``imgsync ARGS`` as a user would, with the stack's settings."""
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


@contextmanager
def running_stack(
    root: Path,
    mode: str = "embedded",
    *,
    pg_database: Callable[[], str] | None = None,
    model: str = "tiny",
    extra_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """Start the stack under ``root`` (an empty folder); stop it on exit.

    ``mode`` is one of MODES; production modes need ``pg_database`` (the conftest factory) and use
    queue names of their own, so that concurrent test runs on one broker never share work.
    """
    home = root / "home"
    server = LiteServer(root / "milvus")
    uri = server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSYNC_")}
    env.update(
        IMGSYNC_HOME=str(home),
        IMGSYNC_MODEL=model,
        IMGSYNC_MILVUS_URI=uri,
        IMGSYNC_BATCH_MAX="8",
        IMGSYNC_BATCH_WAIT_MS="100",
        IMGSYNC_WORKER_CONCURRENCY="2",
        IMGSYNC_METRICS_PORT="0",  # several workers on one host
    )
    overrides: dict[str, str] = {}
    if mode != "embedded":
        assert mode in MODES and pg_database is not None, mode
        tag = uuid.uuid4().hex[:8]
        overrides.update(
            IMGSYNC_BROKER_URL=REDIS_URL if mode == "production" else RABBITMQ_URL,
            IMGSYNC_DATABASE_URL=pg_database(),
            IMGSYNC_QUEUE_PREPROCESS=f"preprocess-{tag}",
            IMGSYNC_QUEUE_ENCODE=f"encode-{tag}",
            IMGSYNC_QUEUE_SKU=f"sku-{tag}",
        )
    overrides.update(extra_env or {})  # the test's settings win (e.g. a broker of its own)
    env.update(overrides)
    queues = (
        env.get("IMGSYNC_QUEUE_PREPROCESS", "preprocess") + "," + env.get("IMGSYNC_QUEUE_SKU", "sku"),
        env.get("IMGSYNC_QUEUE_ENCODE", "encode"),
    )
    subprocess.run([sys.executable, "-m", "worker.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    procs = [_start_worker(logs / f"{name}.log", qs, env) for name, qs in zip(("cpu", "encode"), queues, strict=True)]
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        home=home,
        model=model,
        milvus_uri=uri,
        **{k.removeprefix("IMGSYNC_").lower(): v for k, v in overrides.items()},
    )
    try:
        _wait_ready(logs, procs)
        yield Stack(env=env, uri=uri, settings=settings, logs=logs, procs=procs, server=server)
    except BaseException:
        _print_logs(logs, procs)  # pytest shows captured stdout with the failure
        raise
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        server.stop()


def _start_worker(log: Path, queues: str, env: dict[str, str]) -> subprocess.Popen:
    with log.open("ab") as fh:  # own process group: a test can kill a worker with its pool children
        return subprocess.Popen(worker_command(queues), env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(
    logs: Path, procs: list[subprocess.Popen], names: tuple[str, ...] | list[str] = ("cpu", "encode"), timeout: float = 180
) -> None:
    """Block until every worker logged celery's ``ready.`` line (consumers are up), so a test's first
    events never race the workers' start-up."""
    deadline = time.monotonic() + timeout
    for name, proc in zip(names, procs, strict=True):
        while " ready." not in (logs / f"{name}.log").read_text(errors="replace"):
            assert proc.poll() is None, f"{name} worker exited with {proc.returncode} before it was ready"
            assert time.monotonic() < deadline, f"{name} worker not ready after {timeout:.0f} s"
            time.sleep(0.2)


def _print_logs(logs: Path, procs: list[subprocess.Popen], tail: int = 6000) -> None:
    for p in procs:
        print(f"worker pid {p.pid}: exit code {p.poll()}")
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace")
        print(f"----- {log.name} (last {tail} chars) -----\n{text[-tail:]}")


def images_waiting(client, queue: str) -> int:  # type: ignore[no-untyped-def]
    """Images the messages waiting in a Redis queue carry: one per single-image message, each item
    of a batch message."""
    import json

    from worker.redrive import event_uris

    return sum(len(event_uris(json.loads(m))) for m in client.lrange(queue, 0, -1))
