"""`imgsync up` says which of its processes ended and how (worker.cli.stack.EmbeddedStack.exited),
with real child processes."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from worker.cli.stack import EmbeddedStack


def test_exited_names_each_ended_process_its_status_and_log(make_settings, tmp_path: Path) -> None:
    cpu = subprocess.Popen(["sleep", "30"])
    encode = subprocess.Popen(["sh", "-c", "exit 3"])
    stack = EmbeddedStack(make_settings(), workers=[cpu, encode], log_dir=tmp_path / "logs")
    try:
        encode.wait(10)
        assert stack.exited() == [f"encode worker (pid {encode.pid}) exit status 3, log {tmp_path / 'logs' / 'worker-encode.log'}"]
        cpu.send_signal(signal.SIGKILL)
        cpu.wait(10)
        gone = stack.exited()
        assert gone[0] == f"cpu worker (pid {cpu.pid}) killed by SIGKILL, log {tmp_path / 'logs' / 'worker-cpu.log'}"
        assert len(gone) == 2
    finally:
        cpu.kill()
        cpu.wait()


def test_nothing_ended_is_an_empty_list(make_settings, tmp_path: Path) -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert EmbeddedStack(make_settings(), workers=[p, p], log_dir=tmp_path).exited() == []
    finally:
        p.kill()
        p.wait()


def test_a_worker_that_ended_with_2_or_3_is_reported_with_its_status_and_message(make_settings, tmp_path: Path) -> None:
    """`up` and `demo` end with the status a worker ended with (2: configuration, 3: a service
    unreachable) and its error line from its log; exit 3 used to become 1."""
    import pytest
    import typer

    from worker.cli.main import _exit_as_worker
    from worker.errors import ConfigError

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "worker-encode.log").write_text("starting\nerror: Milvus unreachable at http://127.0.0.1:9\n  (IMGSYNC_MILVUS_URI): refused\n")
    cpu = subprocess.Popen(["sleep", "30"])
    encode = subprocess.Popen(["sh", "-c", "exit 3"])
    try:
        encode.wait(10)
        stack = EmbeddedStack(make_settings(), workers=[cpu, encode], log_dir=logs)
        assert stack.worker_error() == (3, "Milvus unreachable at http://127.0.0.1:9 (IMGSYNC_MILVUS_URI): refused")
        with pytest.raises(typer.Exit) as ended:
            _exit_as_worker(stack)
        assert ended.value.exit_code == 3
        usage = subprocess.Popen(["sh", "-c", "exit 2"])
        usage.wait(10)
        (logs / "worker-encode.log").write_text("error: no such model\n")
        with pytest.raises(ConfigError, match="no such model"):
            _exit_as_worker(EmbeddedStack(make_settings(), workers=[cpu, usage], log_dir=logs))
    finally:
        cpu.kill()
        cpu.wait()


def test_up_with_a_broker_that_does_not_answer_exits_3_before_starting(home: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """IMGSYNC_BROKER_URL naming a server that is not there: `up` printed its ready banner and hung
    while Celery retried for ever; now it exits 3 naming the setting, before starting anything."""
    from typer.testing import CliRunner

    from worker.cli.main import app
    from worker.index.lite_server import free_port

    monkeypatch.setenv("IMGSYNC_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    result = CliRunner().invoke(app, ["up"])
    assert result.exit_code == 3, result.output
    assert "IMGSYNC_BROKER_URL" in result.output and "Ctrl-C stops" not in result.output
    assert not (home / "milvus" / "server.json").exists()


def test_up_with_its_metrics_port_taken_exits_2_before_starting(home: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Another program listens on IMGSYNC_METRICS_PORT: `up` refuses before starting Milvus and the
    workers (it started the whole stack, then found the port taken and stopped it again)."""
    import socket

    from typer.testing import CliRunner

    from worker.cli.main import app

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        monkeypatch.setenv("IMGSYNC_METRICS_PORT", str(taken.getsockname()[1]))
        result = CliRunner().invoke(app, ["up"])
    assert result.exit_code == 2 and "IMGSYNC_METRICS_PORT" in result.output, result.output
    assert not (home / "milvus").exists() and not (home / "logs").exists()
