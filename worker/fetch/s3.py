"""Fetch from S3 (or an S3-compatible store: MinIO, moto), bounded in size and time.

One boto3 client per process and (endpoint, region), created on first use: clients are thread-safe
and costly to build, a forked worker process builds its own. Credentials come from the usual boto3
chain (environment, shared files, instance role); this module reads no environment variable itself.

S3 answers map to the typed errors: a missing key or bucket and a refused access are permanent
(``not_found``); connection faults, timeouts, throttling and 5xx are transient (``fetch_error``,
``fetch_timeout``), retried by the task layer.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from config.settings import FetchConfig
from schemas.reasons import Reason
from worker.errors import PermanentError, TransientError

__all__ = ["fetch_s3", "parse_s3_uri", "s3_client"]

#: Bytes asked of the body stream per read; the deadline is checked between reads.
CHUNK_SIZE = 64 * 1024

#: Error codes meaning "this object cannot be had as addressed": final, retrying cannot help.
#: answers that no retry cures (InvalidObjectState: archived in Glacier, readable once restored)
_NOT_FOUND_CODES = frozenset(
    {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "AccessDenied", "Forbidden", "403", "InvalidObjectState"}
)

_CLIENTS: dict[tuple[str, str, float, float, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _reset_after_fork() -> None:
    """A forked child starts with no clients and a fresh lock (the parent's may be held)."""
    global _CLIENTS_LOCK
    _CLIENTS.clear()
    _CLIENTS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Bucket and key of ``s3://bucket/key``, the key taken as written (not percent-decoded).

    The key keeps spaces, ``+``, ``?``, ``#`` and non-ASCII characters: stored uris are not
    url-encoded, so nothing after the bucket is parsed as a query or fragment.

    Raises:
        PermanentError: ``invalid_event`` when the uri is not ``s3://`` or lacks a bucket or key.
    """
    if uri[:5].lower() != "s3://":
        raise PermanentError(Reason.invalid_event, f"{uri}: not an s3:// uri")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise PermanentError(Reason.invalid_event, f"{uri}: an s3 uri needs a bucket and a key (s3://bucket/key)")
    return bucket, key


def s3_client(cfg: FetchConfig) -> Any:
    """The process's S3 client for ``cfg.s3_endpoint_url`` and ``cfg.s3_region``, built once.

    The client's timeouts are those of the ``cfg`` that built it, each at most its deadline.

    Raises:
        ValueError: a malformed endpoint url.
        botocore.exceptions.BotoCoreError: a region or setting boto3 refuses.
    """
    # no single wait longer than the whole download may take: the request before the body (status,
    # headers) is bounded by these and botocore's 2 attempts, the body by the deadline itself
    connect_timeout, read_timeout = min(cfg.connect_timeout, cfg.deadline), min(cfg.read_timeout, cfg.deadline)
    cache_key = (cfg.s3_endpoint_url, cfg.s3_region, connect_timeout, read_timeout, cfg.ca_bundle)
    client = _CLIENTS.get(cache_key)
    if client is not None:
        return client
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(cache_key)
        if client is None:
            # A session of its own: the default boto3 session is not safe to share across threads.
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=cfg.s3_endpoint_url or None,
                region_name=cfg.s3_region or None,
                verify=cfg.ca_bundle or None,  # None: botocore's own bundle
                config=Config(
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,
                    retries={"max_attempts": 2, "mode": "standard"},
                ),
            )
            _CLIENTS[cache_key] = client
    return client


def fetch_s3(uri: str, cfg: FetchConfig) -> bytes:
    """The bytes of the ``s3://bucket/key`` object, at most ``cfg.max_bytes`` of them.

    The announced size is checked before any byte of the body is read; the body is then read in
    chunks and never past ``cfg.max_bytes + 1``. ``cfg.deadline`` bounds the body: it is checked
    between chunks, and each socket read waits at most the time left (and at most
    ``cfg.read_timeout``). The request before it waits at most the deadline per socket operation,
    in at most 2 attempts; unlike an http(s) download, a server dripping its headers is not cut
    (S3 is the operator's own endpoint, not a URL from the catalog).

    Raises:
        PermanentError: ``not_found`` (no such key or bucket, access denied), ``fetch_too_large``
            (over ``cfg.max_bytes``), ``invalid_event`` (a malformed uri or bucket name).
        TransientError: ``fetch_timeout`` (connect/read timeout, deadline passed) or ``fetch_error``
            (connection refused, throttling, 5xx, missing credentials, a broken stream, an
            endpoint or region boto3 refuses).
    """
    bucket, key = parse_s3_uri(uri)
    started = time.monotonic()
    try:
        client = s3_client(cfg)
    except (BotoCoreError, ValueError) as exc:  # a malformed endpoint url or region
        raise TransientError(
            Reason.fetch_error,
            f"{uri}: cannot build an S3 client for IMGSYNC_S3_ENDPOINT_URL={cfg.s3_endpoint_url!r}, "
            f"IMGSYNC_S3_REGION={cfg.s3_region!r}: {exc}",
        ) from exc
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise _from_client_error(exc, uri, bucket, key) from exc
    except ParamValidationError as exc:  # e.g. a bucket name S3 cannot have
        raise PermanentError(Reason.invalid_event, f"{uri}: not a valid S3 location: {exc}") from exc
    except BotoCoreError as exc:
        raise _from_botocore_error(exc, uri, cfg) from exc

    body = response["Body"]
    try:
        length = response.get("ContentLength")
        if length is not None and length > cfg.max_bytes:
            raise PermanentError(
                Reason.fetch_too_large,
                f"{uri} is {length} bytes, over IMGSYNC_MAX_IMAGE_BYTES={cfg.max_bytes}",
            )
        data = _read_bounded(body, uri, cfg, started)
    finally:
        body.close()
    if len(data) > cfg.max_bytes:
        raise PermanentError(Reason.fetch_too_large, f"{uri} is over IMGSYNC_MAX_IMAGE_BYTES={cfg.max_bytes} bytes")
    return data


def _read_bounded(body: Any, uri: str, cfg: FetchConfig, started: float) -> bytes:
    """At most ``cfg.max_bytes + 1`` bytes of ``body``, within ``cfg.deadline`` of ``started``."""
    limit = cfg.max_bytes + 1
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        left = cfg.deadline - (time.monotonic() - started)
        if left <= 0:
            raise _past_deadline(uri, cfg, size)
        _set_socket_timeout(body, min(cfg.read_timeout, left))
        try:
            chunk = body.read(min(CHUNK_SIZE, limit - size))
        except ReadTimeoutError as exc:
            if time.monotonic() - started >= cfg.deadline:
                raise _past_deadline(uri, cfg, size) from exc
            raise TransientError(
                Reason.fetch_timeout, f"{uri}: no data for {cfg.read_timeout}s after {size} bytes"
            ) from exc
        except BotoCoreError as exc:  # a broken stream, a short body, a checksum mismatch
            raise TransientError(Reason.fetch_error, f"{uri}: download broke after {size} bytes: {exc}") from exc
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _set_socket_timeout(body: Any, seconds: float) -> None:
    try:
        body.set_socket_timeout(seconds)
    except AttributeError:  # a stream without a reachable socket: read_timeout alone applies
        pass


def _past_deadline(uri: str, cfg: FetchConfig, size: int) -> TransientError:
    return TransientError(
        Reason.fetch_timeout, f"{uri}: download not done within {cfg.deadline}s (got {size} bytes)"
    )


def _from_client_error(exc: ClientError, uri: str, bucket: str, key: str) -> PermanentError | TransientError:
    """The typed error for an S3 error answer."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    detail = f"{code or 'error'} (HTTP {status or '?'})"
    if code in _NOT_FOUND_CODES or (status == 404 and not code):
        what = "bucket" if code == "NoSuchBucket" else "object"
        return PermanentError(
            Reason.not_found, f"{uri}: {what} not found or not readable: bucket {bucket!r}, key {key!r}: {detail}"
        )
    if code in ("RequestTimeout", "RequestTimeoutException"):
        return TransientError(Reason.fetch_timeout, f"{uri}: S3 timed out: {detail}")
    # Throttling (SlowDown, 503), 5xx, and 4xx that a fix of settings or credentials can cure
    # (InvalidAccessKeyId, SignatureDoesNotMatch, RequestTimeTooSkewed ...): worth a retry.
    message = error.get("Message")
    return TransientError(Reason.fetch_error, f"{uri}: S3 answered {detail}" + (f": {message}" if message else ""))


def _from_botocore_error(exc: BotoCoreError, uri: str, cfg: FetchConfig) -> TransientError:
    """The typed error for a fault below the S3 protocol (network, credentials)."""
    where = cfg.s3_endpoint_url or "the AWS S3 endpoint"
    if isinstance(exc, ConnectTimeoutError):
        return TransientError(
            Reason.fetch_timeout, f"{uri}: connect to {where} timed out after {cfg.connect_timeout}s"
        )
    if isinstance(exc, ReadTimeoutError):
        return TransientError(Reason.fetch_timeout, f"{uri}: no answer from {where} within {cfg.read_timeout}s")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return TransientError(Reason.fetch_error, f"{uri}: no usable AWS credentials for {where}: {exc}")
    return TransientError(Reason.fetch_error, f"{uri}: cannot reach {where}: {exc}")
