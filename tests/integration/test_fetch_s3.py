"""fetch_s3: the bytes of an s3:// object from a real moto S3 server, bounded in size and time, with
S3's answers mapped to typed errors. Faults moto cannot produce (throttling, access denied, a stalled
or over-long body) come from a small local HTTP server speaking S3's error format."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from config.settings import FetchConfig
from schemas.events import normalize_uri
from schemas.reasons import Reason
from worker.errors import PermanentError, TransientError
from worker.fetch import fetch_bytes
from worker.fetch import s3 as s3_module
from worker.fetch.s3 import parse_s3_uri, s3_client
from worker.index.lite_server import free_port

PAYLOAD = bytes(range(256)) * 8  # 2048 bytes, every byte value
REGION = "us-east-1"


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Test credentials through the boto3 chain; nothing from the developer's ~/.aws or shell."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)


def _cfg(endpoint: str, max_bytes: int = 1 << 20, **kw: float) -> FetchConfig:
    return FetchConfig(max_bytes=max_bytes, file_roots=(), s3_endpoint_url=endpoint, s3_region=REGION, **kw)


@pytest.fixture
def admin(moto_endpoint: str):
    """A plain boto3 client on the moto server, to create buckets and objects."""
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)


@pytest.fixture
def bucket(admin) -> str:
    """A fresh bucket on the moto server."""
    name = f"imgsync-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=name)
    return name


def _permanent(uri: str, cfg: FetchConfig) -> PermanentError:
    with pytest.raises(PermanentError) as info:
        fetch_bytes(uri, cfg)
    return info.value


def _transient(uri: str, cfg: FetchConfig) -> TransientError:
    with pytest.raises(TransientError) as info:
        fetch_bytes(uri, cfg)
    return info.value


# --- against moto ---------------------------------------------------------------------------------

ODD_KEYS = [
    "plain.jpg",
    "a b/c+d/é.jpg",
    "/".join(f"level{i}" for i in range(15)) + "/deep.jpg",
    "q?x=1&y=2#frag.jpg",
    "%41 not-decoded.jpg",
    "商品/画像 1.png",
]


@pytest.mark.parametrize("key", ODD_KEYS)
def test_odd_keys_round_trip(moto_endpoint: str, admin, bucket: str, key: str) -> None:
    """An object's bytes come back unchanged whatever its key holds (spaces, +, ?, #, %, unicode, depth)."""
    body = PAYLOAD + key.encode()
    admin.put_object(Bucket=bucket, Key=key, Body=body)
    uri = normalize_uri(f"s3://{bucket}/{key}")
    assert uri == f"s3://{bucket}/{key}"  # stored as written, not url-encoded
    assert parse_s3_uri(uri) == (bucket, key)
    assert fetch_bytes(uri, _cfg(moto_endpoint)) == body


def test_empty_object_is_empty_bytes(moto_endpoint: str, admin, bucket: str) -> None:
    """A zero-byte object is fetched as b"" (deciding it is no image is the decoder's job)."""
    admin.put_object(Bucket=bucket, Key="empty.jpg", Body=b"")
    assert fetch_bytes(f"s3://{bucket}/empty.jpg", _cfg(moto_endpoint)) == b""


def test_missing_key_is_not_found(moto_endpoint: str, bucket: str) -> None:
    """A key absent from an existing bucket is a permanent not_found naming bucket and key."""
    err = _permanent(f"s3://{bucket}/no such/key.jpg", _cfg(moto_endpoint))
    assert err.reason == Reason.not_found
    assert bucket in str(err) and "no such/key.jpg" in str(err)


def test_archived_object_is_not_found_for_good(moto_endpoint: str, admin, bucket: str) -> None:
    """An object archived in Glacier answers InvalidObjectState until someone restores it: not
    retried (it was, to retries_exhausted, as a transient S3 answer)."""
    admin.put_object(Bucket=bucket, Key="cold.jpg", Body=PAYLOAD, StorageClass="GLACIER")
    err = _permanent(f"s3://{bucket}/cold.jpg", _cfg(moto_endpoint))
    assert err.reason == Reason.not_found and "InvalidObjectState" in str(err)


def test_missing_bucket_is_not_found(moto_endpoint: str) -> None:
    """A bucket that does not exist is a permanent not_found naming the bucket."""
    name = f"imgsync-absent-{uuid.uuid4().hex[:8]}"
    err = _permanent(f"s3://{name}/k.jpg", _cfg(moto_endpoint))
    assert err.reason == Reason.not_found
    assert name in str(err) and "bucket" in str(err)


def test_over_max_bytes_is_refused_before_reading(moto_endpoint: str, admin, bucket: str) -> None:
    """An object over max_bytes is refused as fetch_too_large from its announced size, quickly."""
    admin.put_object(Bucket=bucket, Key="big.jpg", Body=b"\0" * (8 << 20))
    cfg = _cfg(moto_endpoint, max_bytes=1024)
    s3_client(cfg)  # client building is not what is timed
    started = time.monotonic()
    err = _permanent(f"s3://{bucket}/big.jpg", cfg)
    assert err.reason == Reason.fetch_too_large
    assert str(8 << 20) in str(err)
    assert time.monotonic() - started < 2.0


def test_exactly_max_bytes_is_accepted(moto_endpoint: str, admin, bucket: str) -> None:
    """An object of exactly max_bytes is fetched whole; one byte more is refused."""
    admin.put_object(Bucket=bucket, Key="fit.jpg", Body=PAYLOAD)
    admin.put_object(Bucket=bucket, Key="over.jpg", Body=PAYLOAD + b"!")
    cfg = _cfg(moto_endpoint, max_bytes=len(PAYLOAD))
    assert fetch_bytes(f"s3://{bucket}/fit.jpg", cfg) == PAYLOAD
    assert _permanent(f"s3://{bucket}/over.jpg", cfg).reason == Reason.fetch_too_large


def test_uri_without_key_is_invalid(moto_endpoint: str, bucket: str) -> None:
    """s3://bucket and s3://bucket/ name no object: a permanent invalid_event, no request made."""
    for uri in (f"s3://{bucket}", f"s3://{bucket}/"):
        assert _permanent(uri, _cfg(moto_endpoint)).reason == Reason.invalid_event


def test_invalid_bucket_name_is_invalid(moto_endpoint: str) -> None:
    """A bucket name S3 cannot have is refused by boto3's validation: a permanent invalid_event."""
    assert _permanent("s3://bad bucket!/k.jpg", _cfg(moto_endpoint)).reason == Reason.invalid_event


def test_client_is_built_once_per_endpoint_region_and_timeouts(moto_endpoint: str, admin, bucket: str) -> None:
    """Fetches with the same endpoint, region, timeouts and CA bundle share one cached client; other
    timeouts or another bundle get their own."""
    admin.put_object(Bucket=bucket, Key="a.jpg", Body=PAYLOAD)
    cfg = _cfg(moto_endpoint)
    key = (moto_endpoint, REGION, cfg.connect_timeout, cfg.read_timeout, "")
    assert fetch_bytes(f"s3://{bucket}/a.jpg", cfg) == PAYLOAD
    first = s3_module._CLIENTS[key]
    assert fetch_bytes(f"s3://{bucket}/a.jpg", _cfg(moto_endpoint)) == PAYLOAD
    assert s3_module._CLIENTS[key] is first
    assert s3_client(cfg) is first
    other = replace(cfg, read_timeout=cfg.read_timeout + 1)
    assert s3_client(other) is not first
    assert s3_client(replace(cfg, ca_bundle="/etc/ssl/certs/ca-certificates.crt")) is not first


def test_unreachable_endpoint_is_transient() -> None:
    """An endpoint with nothing listening is a transient fetch_error naming the uri, not a hang."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    cfg = _cfg(endpoint, connect_timeout=0.5, read_timeout=0.5, deadline=5.0)
    started = time.monotonic()
    err = _transient("s3://bucket/some key.jpg", cfg)
    assert err.reason == Reason.fetch_error
    assert "s3://bucket/some key.jpg" in str(err) and endpoint in str(err)
    assert time.monotonic() - started < 10.0


# --- against a local fake S3 (faults moto does not produce) ---------------------------------------


class FakeS3:
    """A local HTTP server answering every request with one scripted behaviour."""

    def __init__(self) -> None:
        self.behaviour = "ok"
        self.hits = 0
        self.sent = 0  # body bytes written by the "endless" behaviour
        self.release = threading.Event()
        self.answered = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                fake.hits += 1
                fake.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        kind = self.behaviour
        statuses = {"SlowDown": 503, "AccessDenied": 403, "InvalidAccessKeyId": 403, "InternalError": 500}
        if kind in statuses:
            status = statuses[kind]
            body = f"<Error><Code>{kind}</Code><Message>scripted</Message></Error>".encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif kind == "stall":  # announce 100 kB, send 10 bytes, then go silent
            h.send_response(200)
            h.send_header("Content-Length", "100000")
            h.end_headers()
            h.wfile.write(b"0123456789")
            h.wfile.flush()
            self.release.wait(30)
        elif kind == "endless":  # no Content-Length: chunked, far more than any limit
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(1024):  # 64 MiB
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.sent += len(chunk)
                h.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the client hung up, as it should
        h.close_connection = True
        self.answered.set()


@pytest.fixture
def fake_s3() -> Iterator[FakeS3]:
    """A fresh fake S3 endpoint per test (a new endpoint means a new client with this test's timeouts)."""
    fake = FakeS3()
    fake.thread.start()
    yield fake
    fake.release.set()
    fake.server.shutdown()
    fake.server.server_close()


def test_throttling_is_transient_after_client_retries(fake_s3: FakeS3) -> None:
    """503 SlowDown is a transient fetch_error, after boto3's own retries (3 requests in all)."""
    fake_s3.behaviour = "SlowDown"
    err = _transient("s3://bucket/k.jpg", _cfg(fake_s3.endpoint, connect_timeout=1.0, read_timeout=1.0))
    assert err.reason == Reason.fetch_error
    assert "SlowDown" in str(err) and "503" in str(err)
    # retries={"max_attempts": 2} counts retries, not attempts: the first request and two retries
    assert fake_s3.hits == 3


def test_server_error_is_transient(fake_s3: FakeS3) -> None:
    """500 InternalError is a transient fetch_error."""
    fake_s3.behaviour = "InternalError"
    err = _transient("s3://bucket/k.jpg", _cfg(fake_s3.endpoint, connect_timeout=1.0, read_timeout=1.0))
    assert err.reason == Reason.fetch_error and "500" in str(err)


def test_access_denied_is_not_found(fake_s3: FakeS3) -> None:
    """403 AccessDenied (S3's answer for a missing key without list rights) is a permanent not_found."""
    fake_s3.behaviour = "AccessDenied"
    err = _permanent("s3://bucket/private/k.jpg", _cfg(fake_s3.endpoint))
    assert err.reason == Reason.not_found
    assert "'bucket'" in str(err) and "'private/k.jpg'" in str(err)
    assert fake_s3.hits == 1  # not retried


def test_rejected_credentials_are_transient(fake_s3: FakeS3) -> None:
    """403 InvalidAccessKeyId (a settings fault, not the image's) is a transient fetch_error."""
    fake_s3.behaviour = "InvalidAccessKeyId"
    err = _transient("s3://bucket/k.jpg", _cfg(fake_s3.endpoint))
    assert err.reason == Reason.fetch_error and "InvalidAccessKeyId" in str(err)


def test_stalled_body_is_a_read_timeout(fake_s3: FakeS3) -> None:
    """A body that stops arriving for read_timeout is a transient fetch_timeout."""
    fake_s3.behaviour = "stall"
    started = time.monotonic()
    err = _transient("s3://bucket/k.jpg", _cfg(fake_s3.endpoint, read_timeout=0.3, deadline=30.0))
    assert err.reason == Reason.fetch_timeout
    assert time.monotonic() - started < 3.0


def test_deadline_bounds_the_download(fake_s3: FakeS3) -> None:
    """The deadline cuts a download short although read_timeout alone would wait longer."""
    fake_s3.behaviour = "stall"
    started = time.monotonic()
    err = _transient("s3://bucket/k.jpg", _cfg(fake_s3.endpoint, read_timeout=20.0, deadline=0.6))
    assert err.reason == Reason.fetch_timeout
    assert "0.6s" in str(err)
    assert time.monotonic() - started < 3.0


def test_body_without_length_is_cut_at_max_bytes(fake_s3: FakeS3) -> None:
    """A body with no announced size is read no further than max_bytes + 1, then refused."""
    fake_s3.behaviour = "endless"
    started = time.monotonic()
    err = _permanent("s3://bucket/k.jpg", _cfg(fake_s3.endpoint, max_bytes=100_000))
    assert err.reason == Reason.fetch_too_large
    assert time.monotonic() - started < 3.0
    # the client hung up: the server could not push the 64 MiB (only what socket buffers took)
    assert fake_s3.answered.wait(10)
    assert fake_s3.sent < 32 << 20
