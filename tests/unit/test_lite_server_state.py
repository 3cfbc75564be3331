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


def _listener() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_the_listening_socket_is_told_by_its_owner() -> None:
    """``listening_pid_owns`` tells this process's listener from another process's."""
    from worker.index.lite_server import listening_pid_owns

    sock, port = _listener()
    try:
        assert listening_pid_owns(os.getpid(), port) is True
        assert listening_pid_owns(os.getppid(), port) is False
    finally:
        sock.close()


def test_a_port_taken_before_the_server_binds_it_is_replaced(tmp_path: Path, monkeypatch) -> None:
    """The port chosen for the embedded server can be taken by another program before the server
    binds it (here: on purpose, for the first two choices). The server then exits, or would be taken
    for the program answering there; another port is tried and the real server serves."""
    from pymilvus import MilvusClient

    from worker.index import lite_server

    taken = [_listener(), _listener()]
    ports = iter([taken[0][1], taken[1][1]])
    real_free_port = lite_server.free_port
    monkeypatch.setattr(lite_server, "free_port", lambda: next(ports, None) or real_free_port())
    server = lite_server.LiteServer(tmp_path / "milvus")
    try:
        uri = server.start()
        assert server.port not in (taken[0][1], taken[1][1])
        assert json.loads((tmp_path / "milvus" / STATE_FILE).read_text())["uri"] == uri
        client = MilvusClient(uri=uri)
        assert client.list_collections() == []  # Milvus answers, not the program on the taken port
        client.close()
    finally:
        server.stop()
        for sock, _ in taken:
            sock.close()


def test_a_port_that_stays_taken_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    """When every port tried is taken, start fails with ServiceUnavailable naming the port (exit 3
    for the CLI), and no state file claims a server."""
    import pytest

    from worker.errors import ServiceUnavailable
    from worker.index import lite_server

    sock, port = _listener()
    monkeypatch.setattr(lite_server, "free_port", lambda: port)
    server = lite_server.LiteServer(tmp_path / "milvus")
    try:
        with pytest.raises(ServiceUnavailable, match=f"port {port}"):
            server.start()
        assert not (tmp_path / "milvus" / STATE_FILE).exists() and server.proc is None
    finally:
        server.stop()
        sock.close()
