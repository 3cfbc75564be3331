"""The event sources' own metrics (worker/metrics/sources.py): what each source made of its input,
its failed rounds, its last success, the webhook's answers and the outbox backlog. Real parts: the
webhook over HTTP (uvicorn), SQS on the moto server, the outbox on SQLite and PostgreSQL catalogs,
publishing into an embedded broker; faults are injected into the publish step (a broker that
refuses) where a test says so."""

from __future__ import annotations

import json
import threading
import time
import uuid
from urllib.parse import quote_plus

import boto3
import pytest

from tests.sources.conftest import REGION
from tests.sources.test_outbox import Catalog, setup, uri  # noqa: F401 - setup is a fixture
from tests.sources.test_outbox import Recorder as OutboxRecorder
from tests.sources.test_s3events import aws_record, minio_body
from tests.sources.test_webhook import TOKEN, post_event, request, serving
from worker.errors import ServiceUnavailable
from worker.ledger.db import upgrade
from worker.metrics.sources import OutboxCollector, serve_source_metrics
from worker.sources.catalog_db import upgrade_catalog
from worker.sources.common import publish_events
from worker.sources.outbox import OutboxRelay
from worker.sources.sqs import SqsSource
from worker.sources.webhook import EVENTS_PATH, create_app


def value(name: str, **labels: str) -> float:
    """A sample of this process's registry (0 when the series does not exist yet)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def events(source: str, outcome: str) -> float:
    return value("imgsync_source_events_total", source=source, outcome=outcome)


def failures(source: str) -> float:
    return value("imgsync_source_failures_total", source=source)


def last_success(source: str) -> float:
    return value("imgsync_source_last_success_timestamp_seconds", source=source)


class Refusing:
    """A publish step whose broker refuses (the fault), or the real one once ``up`` is set."""

    def __init__(self) -> None:
        self.up = False

    def __call__(self, settings, events) -> str:
        if not self.up:
            raise ConnectionError("broker down (injected)")
        return publish_events(settings, events)


# --- webhook ---------------------------------------------------------------------------------------


def test_webhook_counts_answers_and_outcomes(make_settings) -> None:
    """Each answer is counted by status; a notification's published/skipped/invalid records are
    counted as such; a refused publish is a failed round that leaves the last-success time alone."""
    settings = make_settings(webhook_token=TOKEN, webhook_max_body=4096)
    upgrade(settings.effective_database_url)
    publish = Refusing()
    publish.up = True
    serve_source_metrics(settings.model_copy(update={"metrics_port": 0}), "webhook")
    code = {c: value("imgsync_webhook_requests_total", code=str(c)) for c in (200, 400, 401, 413, 503)}
    assert all(v is not None for v in code.values())
    before = {o: events("webhook", o) for o in ("published", "skipped", "invalid")}
    failed = failures("webhook")
    with serving(create_app(settings, publish=publish)) as base:
        mixed = minio_body("catalog/SKU-1/a.jpg")
        mixed["Records"].append(minio_body("catalog/SKU-1/readme.txt")["Records"][0])
        broken = minio_body("catalog/SKU-1/b.jpg")["Records"][0]
        broken["s3"]["object"]["sequencer"] = "not hex"
        mixed["Records"].append(broken)
        t0 = time.time()
        assert post_event(base, mixed)[0] == 200
        assert last_success("webhook") >= t0
        assert request(base + EVENTS_PATH, body=b"{not json")[0] == 400
        assert post_event(base, minio_body("catalog/SKU-1/a.jpg"), token="wrong")[0] == 401
        assert post_event(base, minio_body("catalog/SKU-1/" + "x" * 5000 + ".jpg"))[0] == 413
        publish.up = False
        stamp = last_success("webhook")
        assert post_event(base, minio_body("catalog/SKU-1/c.jpg"))[0] == 503
    assert {c: value("imgsync_webhook_requests_total", code=str(c)) - n for c, n in code.items()} == {
        200: 1, 400: 1, 401: 1, 413: 1, 503: 1,
    }
    assert events("webhook", "published") - before["published"] == 1
    assert events("webhook", "skipped") - before["skipped"] == 1
    assert events("webhook", "invalid") - before["invalid"] == 2  # the bad record and the bad body
    assert failures("webhook") - failed == 1
    assert last_success("webhook") == stamp


# --- SQS ----------------------------------------------------------------------------------------------


def test_sqs_counts_rounds(aws, moto_endpoint: str, make_settings) -> None:
    """A round's published, skipped and dead-lettered records are counted; a round whose publish is
    refused counts as a failure (its dead letters still count: their messages are gone)."""
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name=REGION)
    queue = sqs.create_queue(QueueName=f"imgsync-{uuid.uuid4().hex[:10]}")["QueueUrl"]
    settings = make_settings(s3_endpoint_url=moto_endpoint, s3_region=REGION, sqs_queue_url=queue, sqs_wait_seconds=1,
                             sqs_visibility_timeout=1)
    upgrade(settings.effective_database_url)
    publish = Refusing()
    source = SqsSource(settings, queue, publish=publish)
    good = aws_record(quote_plus("catalog/SKU 1/a.jpg", safe=""), sequencer="01")
    other = aws_record(quote_plus("catalog/SKU 1/notes.txt", safe=""), sequencer="02")
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": [good, other]}))
    before = {o: events("sqs", o) for o in ("published", "skipped", "invalid")}
    failed, stamp = failures("sqs"), last_success("sqs")

    with pytest.raises(ServiceUnavailable, match="IMGSYNC_BROKER_URL"):
        source.run(once=True)
    assert failures("sqs") - failed == 1
    assert last_success("sqs") == stamp
    assert [events("sqs", o) for o in before] == list(before.values())  # counted when it comes back

    sqs.send_message(QueueUrl=queue, MessageBody="{poison")
    publish.up = True
    time.sleep(1.2)  # the kept message's visibility timeout passes
    t0 = time.time()
    for _ in range(5):
        source.run(once=True)
        if events("sqs", "published") > before["published"] and events("sqs", "invalid") > before["invalid"]:
            break
    assert events("sqs", "published") - before["published"] == 1
    assert events("sqs", "skipped") - before["skipped"] == 1
    assert events("sqs", "invalid") - before["invalid"] == 1  # the poison message, once
    assert failures("sqs") - failed == 1
    assert last_success("sqs") >= t0


# --- outbox ---------------------------------------------------------------------------------------


def test_outbox_counts_batches_and_reports_its_backlog(setup) -> None:  # noqa: F811 - the fixture
    """The collector shows the rows not relayed yet and the oldest one's age; a drain counts its
    events and dead letters and empties the backlog."""
    _, cat, relay, rec = setup
    p = cat.product("SKU-1")
    cat.image(p, uri("good"))
    cat.image(p, "ftp://host/x.jpg")
    collector = OutboxCollector(relay.engine)
    time.sleep(0.05)
    gauges = {m.name: m.samples[0].value for m in collector.collect()}
    assert gauges["imgsync_outbox_pending_rows"] == 3  # the product and two images
    assert 0 < gauges["imgsync_outbox_oldest_pending_seconds"] < 60
    before = {o: events("outbox", o) for o in ("published", "invalid")}
    relay.drain()
    assert events("outbox", "published") - before["published"] == 1
    assert events("outbox", "invalid") - before["invalid"] == 1
    gauges = {m.name: m.samples[0].value for m in collector.collect()}
    assert gauges == {"imgsync_outbox_pending_rows": 0, "imgsync_outbox_oldest_pending_seconds": 0.0}


def test_outbox_collector_survives_an_unreachable_catalog() -> None:
    """A catalog that cannot be reached yields no outbox gauges; the scrape itself does not fail."""
    from worker.index.lite_server import free_port
    from worker.ledger import make_engine

    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    assert list(OutboxCollector(engine).collect()) == []


def test_outbox_run_counts_failed_rounds(make_settings) -> None:
    """run(): a round the broker refuses counts as a failure; once it is back, the rows are relayed
    and the last-success time moves."""
    settings = make_settings(outbox_poll_seconds=0.1)
    upgrade(settings.effective_database_url)
    upgrade_catalog(settings.effective_catalog_url)
    cat = Catalog(settings.effective_catalog_url)
    cat.image(cat.product("S"), uri("a"))
    rec = OutboxRecorder()
    rec.fail = ConnectionError("broker down (injected)")
    relay = OutboxRelay(settings, publish=rec)
    relay.MAX_BACKOFF = 0.2
    failed, stop = failures("outbox"), threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while failures("outbox") == failed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures("outbox") > failed
        t0 = time.time()
        rec.fail = None
        while last_success("outbox") < t0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last_success("outbox") >= t0
        assert set(rec.take()) == {uri("a")}
    finally:
        stop.set()
        thread.join(5)
        relay.close()


# --- folder ---------------------------------------------------------------------------------------


def test_folder_counts_publishes_and_failed_rescans(make_settings, tmp_path) -> None:
    """run(): a rescan the broker refuses counts as a failure and is retried; once it is back, the
    folder's images are published and counted, and the idle source keeps its last-success time fresh."""
    from tests.helpers import photo
    from worker.sources.folder import FolderSource

    root = tmp_path / "catalog"
    for i in range(3):
        (root / "SKU-1").mkdir(parents=True, exist_ok=True)
        photo(64, 48, i).save(root / "SKU-1" / f"{i}.jpg")
    settings = make_settings()
    upgrade(settings.effective_database_url)
    publish = Refusing()
    source = FolderSource(settings, root, publish=publish)
    source.MAX_BACKOFF = 0.2
    failed, published, stop = failures("folder"), events("folder", "published"), threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while failures("folder") == failed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures("folder") > failed
        assert events("folder", "published") == published
        t0 = time.time()
        publish.up = True
        while events("folder", "published") - published < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events("folder", "published") - published == 3
        while last_success("folder") < t0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last_success("folder") >= t0
    finally:
        stop.set()
        thread.join(10)
