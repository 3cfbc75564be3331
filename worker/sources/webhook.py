"""``imgsync sources webhook``: MinIO bucket notifications over HTTP → image events.

MinIO's webhook target POSTs ``{"EventName", "Key", "Records": [...]}`` (S3-shaped records) to
``POST /events``, with ``Authorization: Bearer <token>``; it probes the endpoint with ``HEAD`` first.
Answers:

- 401: missing or wrong token (nothing read, nothing published); the scheme ``Bearer`` is read in
  any case (RFC 7235), the token exactly;
- 413: body over ``IMGSYNC_WEBHOOK_MAX_BODY`` (announced or counted while reading);
- 400: not JSON or not a notification (kept as a dead letter, reason ``invalid_event``), or a
  ``Content-Length`` that is not a number. MinIO only ever sends notifications, so this is another
  client (or a proxy) talking to the endpoint;
- 503: the broker (or the state database, for a dead letter) is down — MinIO keeps the event and
  retries (with a queue directory configured on its side);
- 200: every event published (records that cannot become events were dead-lettered, skipped keys
  counted), with a JSON summary.

``GET /health`` answers 200 without a token. Records are read by :mod:`worker.sources.s3events`,
shared with the SQS source.
"""

from __future__ import annotations

import hmac
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

from config.settings import Settings
from worker.cli.common import ensure_schema, err_console, handle_errors, settings_from
from worker.errors import ConfigError
from worker.metrics.sources import count_round, serve_source_metrics, source_metrics

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from schemas.events import ImageEvent
    from worker.ledger import Ledger

__all__ = ["EVENTS_PATH", "TASK", "command", "create_app"]

#: an oversize body is read (and dropped) up to this many times the limit before the 413
DRAIN_FACTOR = 4

log = logging.getLogger(__name__)

#: ``task`` of this source's dead letters
TASK = "sources.webhook"
#: the ``source`` label of this source's metrics
SOURCE = "webhook"
#: the path MinIO's ``notify_webhook`` endpoint points at
EVENTS_PATH = "/events"
#: seconds MinIO is asked to wait before retrying after a 503
RETRY_AFTER_SECONDS = 5

Publish = Callable[[Settings, "Sequence[ImageEvent]"], str]


def create_app(settings: Settings, *, ledger: Ledger | None = None, publish: Publish | None = None) -> Starlette:
    """The webhook's ASGI app.

    Raises:
        ConfigError: ``IMGSYNC_WEBHOOK_TOKEN`` is empty (an open endpoint would let anyone index).
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from schemas.reasons import Reason
    from worker.ledger import Ledger, make_engine
    from worker.sources.common import publish_events
    from worker.sources.s3events import (
        InvalidNotification,
        KeyRules,
        parse_notification,
    )

    token = settings.webhook_token
    if not token:
        raise ConfigError("IMGSYNC_WEBHOOK_TOKEN is empty: the webhook refuses to run without a bearer token")
    expected = token.encode()
    limit = settings.webhook_max_body
    rules = KeyRules.from_settings(settings)
    store = ledger or Ledger(make_engine(settings.effective_database_url))
    send = publish or publish_events
    # one publish at a time: the broker connection pool and the embedded (SQLite) broker stay simple
    publish_lock = threading.Lock()

    def publish_locked(events: Sequence[ImageEvent]) -> str:
        with publish_lock:
            return send(settings, events)

    def dead_letter(body: str, error: str) -> None:
        store.dead_letter(task=TASK, body=body, reason=str(Reason.invalid_event), error=error)
        log.warning("webhook: dead-lettered: %s", error.splitlines()[0] if error else "")

    def authorized(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), expected)

    async def read_capped(request: Request) -> bytes | None:
        """The body, or None once it grows past ``limit`` (whatever Content-Length said)."""
        body = bytearray()
        stream = request.stream()
        async for chunk in stream:
            body += chunk
            if len(body) > limit:
                await drain(stream, len(body))
                return None
        return bytes(body)

    async def drain(stream: AsyncIterator[bytes], seen: int = 0) -> None:
        """Read and drop what the client is still sending, up to ``DRAIN_FACTOR`` × the limit: a socket
        closed with unread data answers with a TCP reset that can destroy the 413 before the client
        reads it. Bodies larger than that are cut off (the client may then see the reset)."""
        cap = DRAIN_FACTOR * limit
        async for chunk in stream:
            seen += len(chunk)
            if seen > cap:
                return

    requests = source_metrics().webhook_requests

    async def events(request: Request) -> Response:
        response = await answer(request)
        requests.labels(str(response.status_code)).inc()
        return response

    async def answer(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "missing or wrong bearer token"}, 401, headers={"WWW-Authenticate": "Bearer"})
        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.strip().isascii() and declared.strip().isdigit()):
                return JSONResponse({"error": f"bad Content-Length {declared!r}"}, 400)
            if int(declared) > limit:
                if int(declared) <= DRAIN_FACTOR * limit:
                    await drain(request.stream())
                return _too_large(limit)
        body = await read_capped(request)
        if body is None:
            return _too_large(limit)
        try:
            conv = parse_notification(body, rules, "webhook")
        except InvalidNotification as exc:
            try:
                await run_in_threadpool(dead_letter, body.decode("utf-8", "replace"), str(exc))
            except Exception:  # noqa: BLE001 - kept nowhere yet: MinIO must retry
                log.exception("webhook: could not record a dead letter")
                count_round(SOURCE, failed=True)
                return _unavailable("state database unreachable; retry later")
            count_round(SOURCE, invalid=1)
            return JSONResponse({"error": str(exc)}, 400)
        if conv.events:
            try:
                await run_in_threadpool(publish_locked, conv.events)
            except Exception as exc:  # noqa: BLE001 - broker faults are many; all mean "retry later"
                log.warning("webhook: could not publish %d event(s): %s", len(conv.events), exc)
                count_round(SOURCE, failed=True)
                return _unavailable("broker unreachable; retry later")
        for bad in conv.invalid:
            try:
                await run_in_threadpool(dead_letter, bad.body(), f"record {bad.index}: {bad.error}")
            except Exception:  # noqa: BLE001 - answer 503 so that MinIO retries (publishing is idempotent)
                log.exception("webhook: could not record a dead letter")
                count_round(SOURCE, failed=True)
                return _unavailable("state database unreachable; retry later")
        count_round(SOURCE, published=len(conv.events), skipped=sum(conv.skipped.values()), invalid=len(conv.invalid))
        return JSONResponse(
            {"published": len(conv.events), "skipped": dict(conv.skipped), "dead_letters": len(conv.invalid)}
        )

    async def probe(request: Request) -> Response:  # MinIO's liveness check of the endpoint
        return Response(status_code=200)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route(EVENTS_PATH, events, methods=["POST"]),
            Route(EVENTS_PATH, probe, methods=["HEAD"]),
            Route("/health", health, methods=["GET"]),
        ]
    )


def _too_large(limit: int) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": f"body over {limit} bytes (IMGSYNC_WEBHOOK_MAX_BODY)"}, 413, headers={"Connection": "close"})


def _unavailable(message: str) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, 503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _say(line: str) -> None:
    """One line on stderr, verbatim and unwrapped."""
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``.

    Raises:
        ConfigError: the address cannot be bound (in use, not local), naming the settings.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} (IMGSYNC_WEBHOOK_HOST / IMGSYNC_WEBHOOK_PORT): {exc}"
        ) from exc
    sock.set_inheritable(True)
    return sock


def serve(app: Any) -> Any:
    """A uvicorn server for ``app``: ``.run(sockets=[sock])`` serves until SIGTERM/SIGINT (or
    ``should_exit``), finishing requests in flight."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


@handle_errors
def command(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (default: IMGSYNC_WEBHOOK_HOST).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Listen port (default: IMGSYNC_WEBHOOK_PORT).")] = None,
) -> None:
    """Serve MinIO bucket notifications (webhook target) and publish them as image events."""
    settings = settings_from(ctx)
    app = create_app(settings)  # refuses to run without a token, before anything else
    ensure_schema(settings)
    host = host or settings.webhook_host
    port = settings.webhook_port if port is None else port
    sock = bind(host, port)
    try:
        serve_source_metrics(settings, SOURCE)
    except ConfigError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    _say(f"webhook: listening on http://{host}:{bound}{EVENTS_PATH} (health: /health)")
    server = serve(app)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler that
    # was there before it: with this one there, the command ends normally (exit 0) instead of dying
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    _say("webhook: stopped")
