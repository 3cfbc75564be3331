"""How other commands find the running embedded Milvus Lite server (``milvus/server.json``): a pid
the kernel has since given to another process is not the server, even with something on its port."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from worker.index.lite_server import STATE_FILE, running_server_uri
from worker.procs import start_time


def test_a_reused_pid_is_not_taken_for_the_server(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    try:
        state = {"pid": os.getpid(), "port": port, "uri": uri}
        (tmp_path / STATE_FILE).write_text(json.dumps({**state, "started": start_time(os.getpid())}))
        assert running_server_uri(tmp_path) == uri  # the very process that wrote it
        (tmp_path / STATE_FILE).write_text(json.dumps({**state, "started": "1"}))
        assert running_server_uri(tmp_path) is None  # same pid, another process: the server is gone
        (tmp_path / STATE_FILE).write_text(json.dumps(state))  # written before start times were kept
        assert running_server_uri(tmp_path) == uri
    finally:
        listener.close()
