"""Is a process still there? Used to tell whether a recorded process (the embedded Milvus server, a
broker consumer) still runs; touches nothing but the OS."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

__all__ = ["pid_alive", "start_time", "die_with_parent"]

#: prctl(2) option: the signal a child gets when the thread that started it ends (Linux)
_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (another user's counts; a zombie counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_time(pid: int) -> str | None:
    """Process ``pid``'s start time (clock ticks after boot, from /proc), or None when it is gone, a
    zombie, or /proc cannot be read. A pid the kernel gave to a new process has another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for a child process that must not outlive its parent: on Linux the child gets
    SIGTERM when the parent ends, also when it is killed outright (SIGKILL, OOM killer), so no server
    or worker of an embedded stack is left running. None where the OS offers no such thing.

    The parent must start the child from a thread that lives as long as it (the main thread)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
    parent = os.getpid()

    def _preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent ended before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return _preexec
