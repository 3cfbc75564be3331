"""Is a process still there? Used to tell whether a recorded process (the embedded Milvus server, a
broker consumer) still runs; touches nothing but the OS."""

from __future__ import annotations

import os

__all__ = ["pid_alive", "start_time"]


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
