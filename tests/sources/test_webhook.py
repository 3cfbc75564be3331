"""`imgsync sources webhook`: real HTTP against a uvicorn server (in a thread, or the CLI in a
subprocess), with MinIO's webhook payload shape (see ``minio_body`` in test_s3events), and a real
embedded stack whose workers fetch the objects from a moto S3 server."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from schemas.events import image_id_for
from tests.sources.conftest import REGION
from tests.sources.test_s3events import minio_body
from tests.sources.test_sqs import jpeg, state, wait_for
from tests.stack import Stack
from worker.cli.main import app as cli_app
from worker.index import IMAGES_ALIAS, MilvusStore
from worker.index.lite_server import free_port
from worker.ledger import Ledger, make_engine
from worker.sources.common import publish_events
from worker.sources.webhook import EVENTS_PATH, TASK, bind, create_app, serve

TOKEN = "s3cret-" + uuid.uuid4().hex
MAX_BODY = 4096


@pytest.fixture(scope="module")
def ledger(stack: Stack) -> Ledger:
    return Ledger(make_engine(stack.settings.effective_database_url))


@contextmanager
def serving(asgi) -> Iterator[str]:
    """``asgi`` served by uvicorn in a thread on a free local port: its base URL."""
    sock = bind("127.0.0.1", 0)
    server = serve(asgi)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for("uvicorn started", lambda: server.started, timeout=10)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class Recorder:
    """The real publisher, remembering what it was asked to publish."""

    def __init__(self) -> None:
        self.calls: list[list] = []

    def __call__(self, settings, events) -> str:
        self.calls.append(list(events))
        return publish_events(settings, events)


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def url(stack: Stack, recorder: Recorder) -> Iterator[str]:
    """The webhook on the stack's settings, with a token and a small body limit."""
    settings = stack.settings.model_copy(update={"webhook_token": TOKEN, "webhook_max_body": MAX_BODY})
    with serving(create_app(settings, publish=recorder)) as base:
        yield base


def request(url: str, method: str = "POST", body: bytes | None = None, token: str | None = TOKEN,
            headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """Status, JSON answer (or {}) and headers of one HTTP request."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw, got = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        status, raw, got = err.code, err.read(), dict(err.headers)
    return status, (json.loads(raw) if raw else {}), got


def post_event(url: str, doc: dict, **kw) -> tuple[int, dict, dict]:
    return request(url + EVENTS_PATH, body=json.dumps(doc).encode(), **kw)


# --- routes and guards --------------------------------------------------------------------------


def test_health_and_minio_probe(url: str) -> None:
    """GET /health answers 200 without a token; MinIO's HEAD probe of the endpoint answers 200."""
    assert request(url + "/health", "GET", token=None)[:2] == (200, {"status": "ok"})
    assert request(url + EVENTS_PATH, "HEAD", token=None)[0] == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer{TOKEN}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
def test_missing_or_wrong_token_is_401_and_publishes_nothing(url: str, recorder: Recorder, headers: dict) -> None:
    """Without a `Bearer <token>` header carrying the exact token: 401 with WWW-Authenticate, nothing published."""
    before = len(recorder.calls)
    status, doc, got = post_event(url, minio_body("catalog/SKU-1/a.jpg"), token=None, headers=headers)
    assert status == 401 and "token" in doc["error"]
    assert got.get("www-authenticate", got.get("WWW-Authenticate")) == "Bearer"
    assert len(recorder.calls) == before


def test_the_scheme_is_read_in_any_case(url: str, recorder: Recorder) -> None:
    """`bearer`, `BEARER` and `Bearer` with the right token are accepted (RFC 7235: the scheme is case-insensitive)."""
    for scheme in ("bearer", "BEARER", "Bearer"):
        status, doc, _ = post_event(url, minio_body("catalog/SKU-1/a.jpg"), token=None,
                                    headers={"Authorization": f"{scheme} {TOKEN}"})
        assert status == 200 and doc["published"] == 1, (scheme, doc)


def test_announced_oversize_body_is_413(url: str, recorder: Recorder) -> None:
    """A Content-Length over IMGSYNC_WEBHOOK_MAX_BODY: 413, nothing published."""
    before = len(recorder.calls)
    doc = minio_body("catalog/SKU-1/" + "x" * (MAX_BODY * 2) + ".jpg")
    status, answer, _ = post_event(url, doc)
    assert status == 413 and "IMGSYNC_WEBHOOK_MAX_BODY" in answer["error"]
    assert len(recorder.calls) == before


def test_chunked_oversize_body_is_cut_at_the_limit(url: str, recorder: Recorder) -> None:
    """A chunked body without Content-Length is counted while read: 413 once past the limit."""
    before = len(recorder.calls)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b" " * 500 for _ in range(MAX_BODY // 500 + 4))  # whitespace: valid JSON padding
    conn.request("POST", EVENTS_PATH, body=chunks, encode_chunked=True,
                 headers={"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    assert len(recorder.calls) == before


@pytest.mark.parametrize(
    ("body", "why"),
    [(b"{not json", "not JSON"), (b'{"hello": "world"}', "not an S3 event notification")],
)
def test_invalid_body_is_400_and_a_dead_letter(url: str, ledger: Ledger, recorder: Recorder, body: bytes,
                                               why: str) -> None:
    """Not JSON, or JSON that is no notification: 400, kept in dead letters (invalid_event), nothing published."""
    before, calls = ledger.dead_letter_count(), len(recorder.calls)
    status, doc, _ = request(url + EVENTS_PATH, body=body)
    assert status == 400 and why in doc["error"]
    assert ledger.dead_letter_count() == before + 1
    (letter,) = ledger.dead_letter_rows(limit=1)
    assert (letter["task"], letter["reason"], letter["body"]) == (TASK, "invalid_event", body.decode())
    assert len(recorder.calls) == calls


def test_an_invalid_body_that_cannot_be_kept_is_503(stack: Stack, recorder: Recorder) -> None:
    """When the state database cannot keep the dead letter (here: a PostgreSQL port nobody listens
    on), an invalid body is answered 503, so that MinIO keeps it and retries."""
    settings = stack.settings.model_copy(update={"webhook_token": TOKEN, "webhook_max_body": MAX_BODY})
    down = Ledger(make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"))
    with serving(create_app(settings, ledger=down, publish=recorder)) as base:
        status, doc, headers = request(base + EVENTS_PATH, body=b"{not json")
    assert status == 503 and "state database" in doc["error"]
    assert headers.get("retry-after", headers.get("Retry-After")) == "5"


# --- events end to end ----------------------------------------------------------------------------


def test_minio_events_reach_the_ledger_and_index(url: str, stack: Stack, ledger: Ledger, moto_endpoint: str) -> None:
    """A MinIO put (key with spaces and + escaped as MinIO does) is indexed under its decoded uri; a
    non-image is skipped; a bad record is dead-lettered while the answer stays 200; a later delete
    (greater sequencer) removes the image."""
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    bucket = f"minio-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    key = "products/SKU 7/front view+1.jpg"
    s3.put_object(Bucket=bucket, Key=key, Body=jpeg(70))
    uri = f"s3://{bucket}/{key}"

    status, doc, _ = post_event(url, minio_body(key, bucket=bucket, sequencer="17E3A3DC10F32B0C"))
    assert (status, doc) == (200, {"published": 1, "skipped": {}, "dead_letters": 0})
    wait_for("indexed", lambda: state(ledger, uri) == "indexed")
    store = MilvusStore(stack.uri)
    try:
        (row,) = store.get_images(IMAGES_ALIAS, [image_id_for(uri)])
        assert (row["uri"], row["sku"]) == (uri, "SKU 7")

        mixed = minio_body("products/SKU 7/readme.txt", bucket=bucket)
        broken = minio_body("products/SKU 7/other.jpg", bucket=bucket)["Records"][0]
        broken["s3"]["object"]["sequencer"] = "not hex"
        mixed["Records"].append(broken)
        before = ledger.dead_letter_count()
        status, doc, _ = post_event(url, mixed)
        assert (status, doc) == (200, {"published": 0, "skipped": {"not_image": 1}, "dead_letters": 1})
        assert ledger.dead_letter_count() == before + 1

        delete = minio_body(key, "s3:ObjectRemoved:Delete", bucket=bucket, sequencer="17E3A3DC10F32B0D")
        assert post_event(url, delete)[:2] == (200, {"published": 1, "skipped": {}, "dead_letters": 0})
        wait_for("deleted", lambda: state(ledger, uri) == "deleted")
        assert store.get_images(IMAGES_ALIAS, [image_id_for(uri)]) == []
    finally:
        store.close()


# --- the command ------------------------------------------------------------------------------------


def test_command_answers_503_while_the_broker_is_down(tmp_path: Path) -> None:
    """`imgsync sources webhook --host --port` serves; with the broker down a valid event gets 503 +
    Retry-After (MinIO retries) and no dead letter, and its metrics (IMGSYNC_METRICS_PORT) count the
    503 and the failed round; SIGTERM stops it with exit 0."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSYNC_")}
    env.update(IMGSYNC_HOME=str(tmp_path / "home"), IMGSYNC_WEBHOOK_TOKEN=TOKEN,
               IMGSYNC_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0", IMGSYNC_METRICS_PORT=str(metrics_port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "sources", "webhook", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        seen = [proc.stderr.readline()]
        while "listening on" not in seen[-1] and seen[-1] and len(seen) < 20:  # past any warnings
            seen.append(proc.stderr.readline())
        assert f"listening on http://127.0.0.1:{port}{EVENTS_PATH}" in seen[-1], "".join(seen)
        base = f"http://127.0.0.1:{port}"
        assert request(base + "/health", "GET", token=None)[0] == 200
        status, doc, headers = post_event(base, minio_body("catalog/SKU-1/a.jpg"))
        assert status == 503 and "broker" in doc["error"]
        assert headers.get("retry-after", headers.get("Retry-After")) == "5"
        assert Ledger(make_engine(f"sqlite:///{tmp_path / 'home' / 'state.db'}")).dead_letter_count() == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            scraped = resp.read().decode()
        assert 'imgsync_webhook_requests_total{code="503"} 1.0' in scraped
        assert 'imgsync_webhook_requests_total{code="200"} 0.0' in scraped
        assert 'imgsync_source_failures_total{source="webhook"} 1.0' in scraped
        assert 'imgsync_source_events_total{outcome="published",source="webhook"} 0.0' in scraped
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "webhook: stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    """No IMGSYNC_WEBHOOK_TOKEN: exit 2 naming it, nothing served."""
    result = CliRunner().invoke(cli_app, ["sources", "webhook", "--port", "0"], env={"IMGSYNC_HOME": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert "IMGSYNC_WEBHOOK_TOKEN" in result.output and "Traceback" not in result.output


def test_port_in_use_is_exit_2(tmp_path: Path) -> None:
    """A port another process holds: exit 2 naming IMGSYNC_WEBHOOK_PORT."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            cli_app, ["sources", "webhook", "--host", "127.0.0.1", "--port", str(port)],
            env={"IMGSYNC_HOME": str(tmp_path), "IMGSYNC_WEBHOOK_TOKEN": TOKEN},
        )
    assert result.exit_code == 2, result.output
    assert "IMGSYNC_WEBHOOK_PORT" in result.output
