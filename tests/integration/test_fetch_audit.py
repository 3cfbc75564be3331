"""HTTP fetch against servers that drip their response: IMGSYNC_FETCH_DEADLINE bounds the whole
download, status line and headers included, and a body cut at the deadline is never returned."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from config.settings import FetchConfig
from schemas.reasons import Reason
from tests.helpers import http_server
from worker.errors import TransientError
from worker.fetch import fetch_bytes


class DripHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        try:
            if self.path == "/drip-headers":  # every byte well inside the read timeout
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(30):
                    self.wfile.write(b"X-Pad: 1\r\n")
                    self.wfile.flush()
                    time.sleep(0.25)
                self.wfile.write(b"Content-Length: 2\r\n\r\nok")
            elif self.path == "/drip-status":
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.25)
            elif self.path == "/stall-body":  # no Content-Length: the body ends when the connection does
                self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n\xff\xd8\xff")
                self.wfile.flush()
                time.sleep(6)
        except OSError:
            pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with http_server(DripHandler) as url:
        yield url


def _cfg() -> FetchConfig:
    return FetchConfig(
        max_bytes=1_000_000,
        file_roots=(),
        allow_hosts=("127.0.0.1",),
        connect_timeout=2.0,
        read_timeout=5.0,
        deadline=1.5,
    )


@pytest.mark.parametrize("path", ["/drip-headers", "/drip-status", "/stall-body"])
def test_deadline_bounds_the_whole_response(server: str, path: str) -> None:
    """A server dripping its status line or headers (each byte inside the read timeout) or stalling
    mid-body is cut off at the deadline: fetch_timeout after about 1.5 s, not after the server's
    7.5 s or the 5 s read timeout, and never a partial body."""
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        fetch_bytes(f"{server}{path}", _cfg())
    assert info.value.reason == Reason.fetch_timeout
    assert time.monotonic() - started < 3.0
