"""HTTP(S) fetch with an SSRF guard, timeouts, a total deadline, a byte cap and checked redirects.

The host is resolved once; every address it resolves to must be public (or allowlisted), and the
connection goes to that checked address (no second lookup an attacker could answer differently).
Proxies from the environment are never used.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from config.settings import FetchConfig
from schemas.reasons import Reason
from worker.errors import PermanentError, TransientError

__all__ = ["fetch_http", "check_address", "resolve_checked"]

#: statuses meaning "this image is not there (for us)": permanent
_GONE = {401, 403, 404, 410, 451}
#: statuses meaning "ask again later": transient (besides every 5xx)
_LATER = {408, 425, 429}
_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
_USER_AGENT = "imgsync/0.1 (+catalog image indexer)"


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    address: str  # the checked IP the connection goes to
    #: the host's other checked addresses, tried in turn when a connection to one cannot be made
    fallbacks: tuple[str, ...] = ()

    def host_header(self) -> str:
        """``Host``: an IPv6 literal in brackets, the port unless it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _allowed_by_list(host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow: tuple[str, ...]) -> bool:
    for entry in allow:
        entry = entry.strip()
        if not entry:
            continue
        if entry.lower() == host.lower():
            return True
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def check_address(host: str, address: str, allow: tuple[str, ...] = ()) -> None:
    """Refuse non-global addresses: loopback, private, link-local (cloud metadata), CGNAT, multicast,
    unspecified, reserved, and IPv4-mapped/6to4 forms of them — unless ``allow`` lists the host or a
    network containing it.

    Raises:
        PermanentError: ``forbidden_address``.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None:
            ip = inner
    if _allowed_by_list(host, ip, allow):
        return
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local  # fec0::/10, deprecated but routed
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified or site_local:
        raise PermanentError(
            Reason.forbidden_address,
            f"{host} resolves to {ip}, a non-public address (allow it with IMGSYNC_FETCH_ALLOW_HOSTS)",
        )


def resolve_checked(url: str, cfg: FetchConfig) -> Target:
    """Parse ``url``, resolve its host once and check every address it resolves to."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermanentError(Reason.invalid_event, f"{url}: not an http(s) URL with a host")
    if parts.username or parts.password:
        raise PermanentError(Reason.invalid_event, f"{url}: credentials in URLs are not accepted")
    try:  # an internationalised name as DNS, TLS and the Host header know it (xn--)
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise PermanentError(Reason.invalid_event, f"{url}: {parts.hostname!r} is not a valid host name") from exc
    try:
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise PermanentError(Reason.invalid_event, f"{url}: bad port") from exc
    if port == 0:
        raise PermanentError(Reason.invalid_event, f"{url}: bad port 0")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransientError(Reason.fetch_error, f"{url}: cannot resolve {host}: {exc}") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise TransientError(Reason.fetch_error, f"{url}: {host} has no address")
    for address in addresses:  # every answer must pass: no mixing a public and a private record
        check_address(host, address, cfg.allow_hosts)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port, path, addresses[0], tuple(addresses[1:]))


class _Deadline:
    """Shuts a download's sockets down when its total time is up. Timeouts bound each read, not the
    response: a server dripping its status line or headers a byte at a time would otherwise hold the
    worker far past IMGSYNC_FETCH_DEADLINE (the body is also checked between chunks)."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread
    except OSError:
        pass  # already closed


class _Watched:
    """Hands its socket to the download's :class:`_Deadline` once connected (mixed into urllib3's
    HTTP and HTTPS connections)."""

    sock: socket.socket

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._deadline.watch(self.sock)


class _WatchedHTTP(_Watched, HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, HTTPSConnection):
    pass


def _open(target: Target, cfg: FetchConfig, timeout: urllib3.Timeout):  # type: ignore[no-untyped-def]
    """A connection pool bound to the checked address (TLS still verifies the host name)."""
    if target.scheme == "https":
        import certifi

        return urllib3.HTTPSConnectionPool(
            target.address,
            target.port,
            timeout=timeout,
            retries=False,
            maxsize=1,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=cfg.ca_bundle or certifi.where(),
        )
    return urllib3.HTTPConnectionPool(target.address, target.port, timeout=timeout, retries=False, maxsize=1)


def _watch(pool: urllib3.HTTPConnectionPool, deadline: _Deadline) -> None:
    """Make the connections ``pool`` opens hand their sockets to ``deadline``."""
    pool.ConnectionCls = _WatchedHTTPS if isinstance(pool, urllib3.HTTPSConnectionPool) else _WatchedHTTP
    pool.conn_kw["deadline"] = deadline


def fetch_http(url: str, cfg: FetchConfig) -> bytes:
    """Download an image over HTTP(S), safely.

    Raises:
        PermanentError: ``forbidden_address``, ``not_found`` (401/403/404/410/451, any other status
            but 200 and the transient ones, too many redirects), ``fetch_too_large``, ``corrupt``
            (a body that does not decode as its Content-Encoding says), ``invalid_event``.
        TransientError: ``fetch_timeout`` (connect/read timeout, total deadline) or ``fetch_error``
            (connection refused or broken on every address of the host, 5xx, 408, 425, 429).
    """
    started = time.monotonic()
    deadline = _Deadline(cfg.deadline)
    try:
        return _fetch(url, cfg, started, deadline)
    finally:
        deadline.cancel()


def _fetch(url: str, cfg: FetchConfig, started: float, deadline: _Deadline) -> bytes:
    current = url
    for _hop in range(cfg.max_redirects + 1):
        resolved = resolve_checked(current, cfg)
        addresses = (resolved.address, *resolved.fallbacks)
        for i, address in enumerate(addresses):  # the next address when one cannot be reached
            target = replace(resolved, address=address, fallbacks=())
            remaining = cfg.deadline - (time.monotonic() - started)
            if remaining <= 0:
                raise TransientError(Reason.fetch_timeout, f"{url}: over the {cfg.deadline}s deadline")
            timeout = urllib3.Timeout(connect=min(cfg.connect_timeout, remaining), read=min(cfg.read_timeout, remaining))
            pool = _open(target, cfg, timeout)
            _watch(pool, deadline)
            try:
                resp = _request(url, pool, target, cfg, deadline)
                break
            except _Unreachable as exc:
                pool.close()
                if i == len(addresses) - 1:
                    raise exc.error from exc.__cause__
        try:
            if resp.status in _REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise PermanentError(Reason.not_found, f"{current}: redirect without Location")
                current = urljoin(current, location)
                continue
            return _read_body(url, resp, cfg, started, deadline)
        finally:
            resp.release_conn()
            pool.close()
    raise PermanentError(Reason.not_found, f"{url}: more than {cfg.max_redirects} redirects")


class _Unreachable(Exception):
    """No connection could be made to one address (refused, unreachable, connect timeout): the
    host's next address is tried; ``error`` is what the fetch raises when none is left."""

    def __init__(self, error: TransientError) -> None:
        super().__init__(str(error))
        self.error = error


def _request(url: str, pool: urllib3.HTTPConnectionPool, target: Target, cfg: FetchConfig, deadline: _Deadline):  # type: ignore[no-untyped-def]
    """Send the GET and read the status line and headers.

    Raises:
        _Unreachable: no connection was made.
        TransientError: ``fetch_timeout`` or ``fetch_error`` once connected.
    """
    try:
        return pool.urlopen(
            "GET",
            target.path,
            headers={"Host": target.host_header(), "User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5"},
            redirect=False,
            preload_content=False,
            assert_same_host=False,
        )
    # urllib3 2 makes NewConnectionError (refused, unreachable) a ConnectTimeoutError: test it first
    except urllib3.exceptions.NewConnectionError as exc:
        if deadline.expired:
            pool.close()
            raise TransientError(Reason.fetch_timeout, f"{url}: over the {cfg.deadline}s deadline") from exc
        raise _Unreachable(TransientError(Reason.fetch_error, f"{url}: cannot connect to {target.address}: {exc}")) from exc
    except urllib3.exceptions.ConnectTimeoutError as exc:
        raise _Unreachable(TransientError(Reason.fetch_timeout, f"{url}: connect to {target.address} timed out: {exc}")) from exc
    except urllib3.exceptions.ReadTimeoutError as exc:
        pool.close()
        raise TransientError(Reason.fetch_timeout, f"{url}: timed out: {exc}") from exc
    except urllib3.exceptions.HTTPError as exc:
        pool.close()
        if deadline.expired:
            raise TransientError(Reason.fetch_timeout, f"{url}: over the {cfg.deadline}s deadline") from exc
        raise TransientError(Reason.fetch_error, f"{url}: {type(exc).__name__}: {exc}") from exc


def _read_body(url: str, resp, cfg: FetchConfig, started: float, deadline: _Deadline) -> bytes:  # type: ignore[no-untyped-def]
    if resp.status in _GONE:
        raise PermanentError(Reason.not_found, f"{url}: HTTP {resp.status}")
    if resp.status in _LATER or resp.status >= 500:
        raise TransientError(Reason.fetch_error, f"{url}: HTTP {resp.status}")
    if resp.status != 200:
        raise PermanentError(Reason.not_found, f"{url}: HTTP {resp.status}")
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
        raise PermanentError(
            Reason.fetch_too_large, f"{url}: {declared} bytes is over IMGSYNC_MAX_IMAGE_BYTES={cfg.max_bytes}"
        )
    body = bytearray()
    try:
        while chunk := resp.read1(_CHUNK):  # returns what has arrived: the deadline is checked often
            body.extend(chunk)
            if len(body) > cfg.max_bytes:
                raise PermanentError(
                    Reason.fetch_too_large, f"{url}: over IMGSYNC_MAX_IMAGE_BYTES={cfg.max_bytes} bytes"
                )
            if time.monotonic() - started > cfg.deadline:
                raise TransientError(Reason.fetch_timeout, f"{url}: over the {cfg.deadline}s deadline")
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise TransientError(Reason.fetch_timeout, f"{url}: read timed out: {exc}") from exc
    except urllib3.exceptions.DecodeError as exc:  # a Content-Encoding (gzip, deflate ...) its body does not follow
        raise PermanentError(Reason.corrupt, f"{url}: the body does not decode as its Content-Encoding says: {exc}") from exc
    except urllib3.exceptions.HTTPError as exc:  # connection broken, short body ...
        if deadline.expired:
            raise TransientError(Reason.fetch_timeout, f"{url}: over the {cfg.deadline}s deadline") from exc
        raise TransientError(Reason.fetch_error, f"{url}: connection broken: {exc}") from exc
    if deadline.expired:  # the socket was shut mid-body: what arrived is not the whole file
        raise TransientError(Reason.fetch_timeout, f"{url}: over the {cfg.deadline}s deadline")
    return bytes(body)
