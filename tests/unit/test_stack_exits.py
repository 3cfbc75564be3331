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
