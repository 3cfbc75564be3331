"""The embedded stack's lifecycle as a user meets it: one stack per IMGSYNC_HOME, nothing left running
when `up` or `demo` ends however it ends, and nothing lost when the next `up` takes over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import photo
from worker.cli.stack import LOCK_FILE


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSYNC_")}
    env.update(IMGSYNC_HOME=str(home), IMGSYNC_MODEL="tiny", IMGSYNC_METRICS_PORT="0")
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _spawn(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=env, stdout=f, stderr=subprocess.STDOUT)


def _children(home: Path, proc: subprocess.Popen[bytes], timeout: float = 150) -> list[int]:
    """The server and worker pids the running stack recorded, once all three are started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the stack ended early: {proc.returncode}"
        try:
            doc = json.loads((home / LOCK_FILE).read_text() or "{}")
        except (FileNotFoundError, ValueError):
            doc = {}
        if len(doc.get("children", [])) == 3 and (home / "milvus" / "server.json").exists():
            return [pid for pid, _ in doc["children"]]
        time.sleep(0.3)
    raise AssertionError("the stack did not start")


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _all_gone(pids: list[int], timeout: float = 90) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_group_alive(p) for p in pids):
            return True
        time.sleep(0.3)
    return False


def _catalog(root: Path, n_skus: int = 2, per_sku: int = 2) -> Path:
    for s in range(n_skus):
        for i in range(per_sku):
            (root / f"SKU-{s}").mkdir(parents=True, exist_ok=True)
            photo(96, 80, seed=s * 10 + i).save(root / f"SKU-{s}" / f"{i}.jpg")
    return root


def test_a_second_up_on_the_same_home_is_refused_and_the_first_keeps_running(tmp_path: Path) -> None:
    """A second `up` on a home in use exits 2 naming the running one, and touches nothing of it."""
    home = tmp_path / "home"
    env = _env(home)
    first = _spawn(env, tmp_path / "up1.log", "up")
    try:
        pids = _children(home, first)
        deadline = time.monotonic() + 60
        while not (samples := set((home / "metrics" / "stack").iterdir())) and time.monotonic() < deadline:
            time.sleep(0.3)  # the workers write their first samples
        assert samples
        second = _cli(env, "up", timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"in use by another `imgsync up` or `imgsync demo` (pid {first.pid})" in " ".join(second.stderr.split())
        assert "Traceback" not in second.stderr
        assert first.poll() is None and all(_group_alive(p) for p in pids)
        assert samples <= set((home / "metrics" / "stack").iterdir())  # the running stack's samples stay
        status = _cli(env, "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["ready"] is True
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(120)
    assert _all_gone(pids)


def test_up_killed_outright_leaves_nothing_running_and_the_next_up_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL of `up` stops its server and workers; the next `up` takes over and every image gets indexed."""
    home = tmp_path / "home"
    env = _env(home)
    catalog = _catalog(tmp_path / "catalog")
    up = _spawn(env, tmp_path / "up1.log", "up")
    pids = _children(home, up)
    queued = _cli(env, "index", str(catalog), "--json")
    assert queued.returncode == 0, queued.stderr
    up.kill()
    up.wait(30)
    assert _all_gone(pids, timeout=60), "the killed up's server or workers are still running"
    status = _cli(env, "status", "--json")
    assert status.returncode == 3 and json.loads(status.stdout)["ready"] is False

    up = _spawn(env, tmp_path / "up2.log", "up")
    try:
        pids = _children(home, up)
        done = _cli(env, "index", str(catalog), "--wait", "--json", "--timeout", "150")
        assert done.returncode == 0, done.stdout + done.stderr
        assert {r["outcome"] for r in json.loads(done.stdout)["results"]} <= {"indexed", "unchanged"}
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(120) == 0
    assert _all_gone(pids)
    verify = _cli(env, "verify", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["problems"] == 0, verify.stdout


def test_demo_stopped_with_sigterm_stops_its_stack(tmp_path: Path) -> None:
    """SIGTERM stops `demo` as Ctrl-C does: exit 130, its stack stopped cleanly, nothing left running."""
    home = tmp_path / "home"
    demo = _spawn(_env(home), tmp_path / "demo.log", "demo", "--images", "40", "--skus", "4")
    pids = _children(home, demo)
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(120) == 130, (tmp_path / "demo.log").read_text()
    assert _all_gone(pids, timeout=30)
    assert not (home / "milvus" / "server.json").exists()  # stopped by the demo, not by its death


def test_demo_stops_waiting_when_a_stack_process_ends(tmp_path: Path) -> None:
    """A worker of the demo's stack dies (here the encode worker, killed outright; a full disk did it
    in the audit): the demo says which process ended and exits 1 at once, instead of waiting out its
    --timeout with "no progress", and leaves nothing running."""
    home = tmp_path / "home"
    demo = _spawn(_env(home), tmp_path / "demo.log", "demo", "--images", "40", "--skus", "4", "--timeout", "600")
    pids = _children(home, demo)
    os.kill(pids[-1], signal.SIGKILL)  # the encode worker: nothing gets indexed any more
    started = time.monotonic()
    code = demo.wait(120)
    log = (tmp_path / "demo.log").read_text()
    assert code == 1, log
    assert time.monotonic() - started < 60
    assert "a stack process ended: encode worker" in log and "Traceback" not in log
    assert _all_gone(pids, timeout=30)
