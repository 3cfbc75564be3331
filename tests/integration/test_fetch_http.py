"""HTTP fetch against a real local HTTP server: timeouts, byte cap, status mapping, redirects, and
the SSRF guard (every refused address is refused before any connection is attempted)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from config.settings import FetchConfig
from schemas.reasons import Reason
from tests.helpers import http_server
from worker.errors import PermanentError, TransientError
from worker.fetch import fetch_bytes
from worker.fetch import http as http_fetch

BODY = b"\xff\xd8\xff" + b"x" * 5000


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        routes = {
            "/ok.jpg": lambda: self._send(200, BODY),
            "/missing.jpg": lambda: self._send(404, b"no"),
            "/forbidden.jpg": lambda: self._send(403, b"no"),
            "/boom.jpg": lambda: self._send(503, b"later"),
            "/huge-declared.jpg": lambda: self._send(200, b"", length=10**9),
            "/huge-streamed.jpg": self._stream_forever,
            "/slow.jpg": self._slow,
            "/to-ok": lambda: self._redirect("/ok.jpg"),
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-private": lambda: self._redirect("http://10.0.0.7/x.jpg"),
            "/loop": lambda: self._redirect("/loop"),
            "/timeout.jpg": lambda: self._send(408, b"again"),
            "/too-early.jpg": lambda: self._send(425, b"again"),
            "/throttled.jpg": lambda: self._send(429, b"later"),
            "/bad-gzip.jpg": lambda: self._send(200, b"\xff\xd8 not gzip at all", encoding="gzip"),
            "/bad-deflate.jpg": lambda: self._send(200, b"\x00\x01 not deflate", encoding="deflate"),
            "/echo-host": lambda: self._send(200, self.headers.get("Host", "").encode()),
        }
        routes.get(self.path, lambda: self._send(404, b"?"))()

    def _send(self, status: int, body: bytes, length: int | None = None, encoding: str = "") -> None:
        self.send_response(status)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream_forever(self) -> None:
        self.send_response(200)
        self.end_headers()  # no Content-Length: the cap must stop the read
        try:
            for _ in range(10_000):
                self.wfile.write(b"y" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _slow(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"z" * 10)
                self.wfile.flush()
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with http_server(Handler) as url:
        yield url


@pytest.fixture(autouse=True)
def only_loopback_connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Safety net: the tests never open a connection to anything but 127.0.0.1."""
    opened: list[str] = []
    real = http_fetch._open

    def guarded(target, cfg, timeout):  # type: ignore[no-untyped-def]
        assert ipaddress.ip_address(target.address).is_loopback, f"test tried to connect to {target.address}"
        opened.append(target.address)
        return real(target, cfg, timeout)

    monkeypatch.setattr(http_fetch, "_open", guarded)
    return opened


def cfg(**kw: object) -> FetchConfig:
    values: dict = {"max_bytes": 1_000_000, "file_roots": (), "allow_hosts": ("127.0.0.1",),
                    "connect_timeout": 2.0, "read_timeout": 2.0, "deadline": 10.0}
    values.update(kw)
    return FetchConfig(**values)


def reason_of(url: str, config: FetchConfig) -> tuple[type, Reason]:
    with pytest.raises((PermanentError, TransientError)) as err:
        fetch_bytes(url, config)
    return type(err.value), err.value.reason


def test_fetches_bytes_through_allowlist(server: str) -> None:
    """An allowlisted local server is fetched, bytes intact."""
    assert fetch_bytes(f"{server}/ok.jpg", cfg()) == BODY


def test_redirect_followed_and_rechecked(server: str) -> None:
    """A redirect to an allowed place is followed."""
    assert fetch_bytes(f"{server}/to-ok", cfg()) == BODY


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/missing.jpg", (PermanentError, Reason.not_found)), ("/forbidden.jpg", (PermanentError, Reason.not_found)),
     ("/boom.jpg", (TransientError, Reason.fetch_error)), ("/loop", (PermanentError, Reason.not_found)),
     ("/timeout.jpg", (TransientError, Reason.fetch_error)), ("/too-early.jpg", (TransientError, Reason.fetch_error)),
     ("/throttled.jpg", (TransientError, Reason.fetch_error)),
     ("/bad-gzip.jpg", (PermanentError, Reason.corrupt)), ("/bad-deflate.jpg", (PermanentError, Reason.corrupt))],
)
def test_status_mapping(server: str, path: str, expected: tuple) -> None:
    """404/403 and redirect loops are permanent not_found; 5xx, 408, 425 and 429 ask again later
    (408 and 425 were not_found); a body that does not decode as its Content-Encoding says is corrupt
    for good (urllib3's DecodeError escaped untyped: retried until retries_exhausted)."""
    assert reason_of(f"{server}{path}", cfg()) == expected


def test_declared_too_large_refused_without_reading(server: str) -> None:
    """A Content-Length over the cap is refused at once."""
    assert reason_of(f"{server}/huge-declared.jpg", cfg()) == (PermanentError, Reason.fetch_too_large)


def test_streamed_body_stops_at_cap(server: str) -> None:
    """A body without Content-Length is cut at the cap (never read unbounded)."""
    started = time.monotonic()
    assert reason_of(f"{server}/huge-streamed.jpg", cfg(max_bytes=200_000)) == (PermanentError, Reason.fetch_too_large)
    assert time.monotonic() - started < 5


def test_slow_body_hits_deadline(server: str) -> None:
    """A server trickling bytes is cut by the total deadline (transient fetch_timeout)."""
    started = time.monotonic()
    assert reason_of(f"{server}/slow.jpg", cfg(deadline=1.0)) == (TransientError, Reason.fetch_timeout)
    assert time.monotonic() - started < 4


def test_loopback_refused_without_allowlist(server: str, only_loopback_connections: list[str]) -> None:
    """Without the allowlist, the local server itself is a forbidden address; nothing is opened."""
    assert reason_of(f"{server}/ok.jpg", cfg(allow_hosts=())) == (PermanentError, Reason.forbidden_address)
    assert only_loopback_connections == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.jpg",
        "http://localhost/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/x.jpg",
        "http://[::1]/x.jpg",
        "http://2130706433/x.jpg",
        "http://0x7f000001/x.jpg",
        "http://0177.0.0.1/x.jpg",
        "http://10.1.2.3/x.jpg",
        "http://192.168.0.10/x.jpg",
        "http://172.16.5.4/x.jpg",
        "http://100.64.0.1/x.jpg",
        "http://0.0.0.0/x.jpg",
        "http://224.0.0.1/x.jpg",
        "http://[fe80::1]/x.jpg",
        "http://[fd00::1]/x.jpg",
        "http://[fec0::1]/x.jpg",
    ],
)
def test_forbidden_addresses(url: str, only_loopback_connections: list[str]) -> None:
    """Loopback, metadata, private, CGNAT, multicast, unspecified, mapped and odd IP spellings are
    refused before connecting."""
    assert reason_of(url, cfg(allow_hosts=())) == (PermanentError, Reason.forbidden_address)
    assert only_loopback_connections == []


@pytest.mark.parametrize("path", ["/to-metadata", "/to-private"])
def test_redirect_to_forbidden_address(server: str, path: str, only_loopback_connections: list[str]) -> None:
    """A redirect from an allowed server to a forbidden address is refused at the hop."""
    assert reason_of(f"{server}{path}", cfg()) == (PermanentError, Reason.forbidden_address)
    assert only_loopback_connections == ["127.0.0.1"]


def test_allowlist_by_network() -> None:
    """The allowlist takes CIDRs as well as host names."""
    http_fetch.check_address("intranet", "10.2.3.4", ("10.0.0.0/8",))
    with pytest.raises(PermanentError):
        http_fetch.check_address("intranet", "10.2.3.4", ("192.168.0.0/16",))
    http_fetch.check_address("8.8.8.8", "8.8.8.8")  # a public address passes (no connection made)


def test_connection_refused_is_transient() -> None:
    """Nothing listening on the port: a transient fetch_error, retried later (it was called
    fetch_timeout: urllib3 2 makes a refused connection a kind of ConnectTimeoutError)."""
    from worker.index.lite_server import free_port

    assert reason_of(f"http://127.0.0.1:{free_port()}/x.jpg", cfg()) == (TransientError, Reason.fetch_error)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Stand-in DNS (no resolver answers made-up names here): ``{name: [addresses]}``."""
    names: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in names[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(http_fetch.socket, "getaddrinfo", getaddrinfo)
    return names


def test_the_next_address_is_tried_when_one_is_down(server: str, dns: dict, only_loopback_connections: list[str]) -> None:
    """A host whose first address refuses connections is fetched from its second (only the first
    was tried)."""
    port = server.rsplit(":", 1)[1]
    dns["two.test"] = ["127.0.0.2", "127.0.0.1"]  # the server listens on 127.0.0.1 alone
    config = cfg(allow_hosts=("127.0.0.0/8",))
    assert fetch_bytes(f"http://two.test:{port}/ok.jpg", config) == BODY
    assert only_loopback_connections == ["127.0.0.2", "127.0.0.1"]
    dns["none.test"] = ["127.0.0.2", "127.0.0.3"]
    assert reason_of(f"http://none.test:{port}/ok.jpg", config) == (TransientError, Reason.fetch_error)


def test_host_header_of_international_names(server: str, dns: dict) -> None:
    """An internationalised host name is resolved and sent as its xn-- form (the Host header went
    out as Latin-1 bytes, or the fetch raised UnicodeEncodeError: internal_error)."""
    port = server.rsplit(":", 1)[1]
    dns["xn--bcher-kva.test"] = dns["xn--jvrxl.test"] = ["127.0.0.1"]
    config = cfg(allow_hosts=("127.0.0.0/8",))
    assert fetch_bytes(f"http://bücher.test:{port}/echo-host", config) == f"xn--bcher-kva.test:{port}".encode()
    assert fetch_bytes(f"http://商品.test:{port}/echo-host", config) == f"xn--jvrxl.test:{port}".encode()
    assert reason_of(f"http://{'a' * 64}.test/x.jpg", config) == (PermanentError, Reason.invalid_event)


def test_port_zero_is_invalid(dns: dict) -> None:
    """Port 0 names no server (it was taken as "no port": port 80)."""
    dns["zero.test"] = ["127.0.0.1"]
    assert reason_of("http://zero.test:0/x.jpg", cfg(allow_hosts=("127.0.0.0/8",))) == (PermanentError, Reason.invalid_event)


@pytest.mark.parametrize(
    ("scheme", "host", "port", "header"),
    [("http", "::1", 8080, "[::1]:8080"), ("http", "::1", 80, "[::1]"), ("http", "h.test", 443, "h.test:443"),
     ("https", "h.test", 80, "h.test:80"), ("https", "h.test", 443, "h.test"), ("http", "h.test", 80, "h.test")],
)
def test_host_header(scheme: str, host: str, port: int, header: str) -> None:
    """IPv6 literals in brackets; the port left out only when it is the scheme's own (it was left
    out for 80 and 443 whatever the scheme, and an IPv6 address went out bare)."""
    assert http_fetch.Target(scheme, host, port, "/", "127.0.0.1").host_header() == header


@pytest.fixture(scope="module")
def private_ca_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTPS server whose certificate a private CA signed (made here with the openssl command):
    ``(base URL on localhost, CA bundle)``."""
    import ssl
    import subprocess
    from http.server import ThreadingHTTPServer

    d = tmp_path_factory.mktemp("private-ca")
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    )
    for cmd in (
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=imgsync-test-CA "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
        "openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=localhost",
        "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf",
    ):
        subprocess.run(cmd.split(), cwd=d, check=True, capture_output=True)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "srv.pem", d / "srv.key")
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{httpd.server_address[1]}", d / "ca.pem"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_from_a_private_ca_needs_its_bundle(private_ca_server: tuple[str, Path]) -> None:
    """An internal CDN whose certificate a private CA signed: refused as untrusted with the public
    CAs (a transient fetch_error: the operator can fix it), fetched with IMGSYNC_FETCH_CA_BUNDLE."""
    base, bundle = private_ca_server
    allow = ("127.0.0.0/8", "::1", "localhost")
    assert reason_of(f"{base}/ok.jpg", cfg(allow_hosts=allow)) == (TransientError, Reason.fetch_error)
    assert fetch_bytes(f"{base}/ok.jpg", cfg(allow_hosts=allow, ca_bundle=str(bundle))) == BODY
