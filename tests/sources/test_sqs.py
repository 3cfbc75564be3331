"""`imgsync sources sqs` against a real moto server (S3 + SQS + SNS, real boto3) and a real embedded
stack (Milvus Lite server, Celery workers, tiny model).

moto 5.2.5 delivers bucket notifications to SQS (directly, or through an SNS topic with the SNS
envelope), but its records carry no ``sequencer``. The ordering tests therefore send real-shaped S3
notification bodies (with sequencers, as AWS documents them) to the queue themselves."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote_plus

import boto3
import pytest
from typer.testing import CliRunner

from schemas.events import ImageEvent, image_id_for, normalize_version
from tests.helpers import photo
from tests.sources.conftest import REGION
from tests.sources.test_s3events import TEST_EVENT, aws_record
from tests.stack import Stack
from worker.cli.main import app
from worker.index import IMAGES_ALIAS, MilvusStore
from worker.index.lite_server import free_port
from worker.ledger import Ledger, make_engine
from worker.sources.sqs import TASK, SqsSource

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def s3(aws, moto_endpoint: str):
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)


@pytest.fixture(scope="module")
def sqs(aws, moto_endpoint: str):
    return boto3.client("sqs", endpoint_url=moto_endpoint, region_name=REGION)


@pytest.fixture
def queue(sqs) -> str:
    """A fresh queue's URL."""
    return sqs.create_queue(QueueName=f"imgsync-{uuid.uuid4().hex[:10]}")["QueueUrl"]


@pytest.fixture
def bucket(s3) -> str:
    name = f"imgsync-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def ledger(stack: Stack) -> Ledger:
    return Ledger(make_engine(stack.settings.effective_database_url))


@pytest.fixture(scope="module")
def milvus(stack: Stack) -> Iterator[MilvusStore]:
    store = MilvusStore(stack.uri)
    yield store
    store.close()


def source_for(stack: Stack, queue_url: str, **overrides: object) -> SqsSource:
    """An in-process SQS source on the stack's settings (1 s long polls)."""
    settings = stack.settings.model_copy(update={"sqs_queue_url": queue_url, "sqs_wait_seconds": 1, **overrides})
    return SqsSource(settings, queue_url)


def drain(source: SqsSource, rounds: int = 5) -> list:
    """Rounds until one receives nothing; returns the stats of those that did."""
    out = []
    for _ in range(rounds):
        stats = source.round()
        if not stats.messages:
            return out
        out.append(stats)
    raise AssertionError(f"queue not drained in {rounds} rounds: {[s.line() for s in out]}")


def depth(sqs, queue_url: str) -> int:
    """Messages in the queue, visible or in flight."""
    attrs = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def wait_for(what: str, check: Callable[[], object], timeout: float = TIMEOUT) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def jpeg(seed: int, w: int = 160, h: int = 120) -> bytes:
    buf = io.BytesIO()
    photo(w, h, seed).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def state(ledger: Ledger, uri: str) -> str | None:
    row = ledger.get(image_id_for(uri))
    return row.state if row else None


def send(sqs, queue_url: str, body: dict | str) -> None:
    sqs.send_message(QueueUrl=queue_url, MessageBody=body if isinstance(body, str) else json.dumps(body))


# --- bucket notifications end to end --------------------------------------------------------------

ODD_KEYS = {
    "catalog/SKU 1/front view.jpg": "SKU 1",
    "catalog/SKU+2/a+b.jpg": "SKU+2",
    "catalog/商品-3/写真 1.png": "商品-3",
    "a/b/c/d/e/f/SKU-4/deep.jpeg": "SKU-4",
}


def test_bucket_notifications_drive_the_index(stack: Stack, s3, sqs, queue: str, bucket: str, ledger, milvus,
                                              moto_endpoint: str) -> None:
    """moto's own notifications: puts of odd keys get indexed under their decoded uri and SKU (the CLI
    --once takes the first batch), an overwrite re-encodes, a delete removes; test event, a non-image
    and a folder key are skipped; an SNS-wrapped notification works the same."""
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]
        },
    )
    for i, key in enumerate(ODD_KEYS):
        s3.put_object(Bucket=bucket, Key=key, Body=jpeg(i))
    s3.put_object(Bucket=bucket, Key="catalog/SKU 1/notes.txt", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="catalog/SKU 1/", Body=b"")

    env = {**stack.env, "IMGSYNC_SQS_QUEUE_URL": queue, "IMGSYNC_SQS_WAIT_SECONDS": "1"}
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "sources", "sqs", "--once"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"listening on {queue}" in proc.stderr and "event(s) published" in proc.stderr
    assert "Traceback" not in proc.stderr
    source = source_for(stack, queue)
    rest = drain(source)
    assert depth(sqs, queue) == 0

    uris = {f"s3://{bucket}/{key}": sku for key, sku in ODD_KEYS.items()}
    for uri in uris:
        wait_for(f"{uri} indexed", lambda uri=uri: state(ledger, uri) == "indexed")
    rows = {r["image_id"]: r for r in milvus.get_images(IMAGES_ALIAS, [image_id_for(u) for u in uris])}
    assert {(r["uri"], r["sku"]) for r in rows.values()} == set(uris.items())
    assert state(ledger, f"s3://{bucket}/catalog/SKU 1/notes.txt") is None
    assert all(s.dead_letters == 0 for s in rest)

    front = f"s3://{bucket}/catalog/SKU 1/front view.jpg"
    old_hash = ledger.get(image_id_for(front)).content_hash
    s3.put_object(Bucket=bucket, Key="catalog/SKU 1/front view.jpg", Body=jpeg(99, 200, 150))
    gone = f"s3://{bucket}/catalog/SKU+2/a+b.jpg"
    s3.delete_object(Bucket=bucket, Key="catalog/SKU+2/a+b.jpg")
    stats = drain(source)
    assert sum(s.published for s in stats) == 2
    wait_for("overwrite re-encoded", lambda: (r := ledger.get(image_id_for(front))).state == "indexed"
             and r.content_hash != old_hash)
    wait_for("delete recorded", lambda: state(ledger, gone) == "deleted")
    (row,) = milvus.get_images(IMAGES_ALIAS, [image_id_for(front)])
    assert row["content_hash"] == ledger.get(image_id_for(front)).content_hash
    assert milvus.get_images(IMAGES_ALIAS, [image_id_for(gone)]) == []

    # through SNS: the S3 JSON arrives in the envelope's Message
    sns = boto3.client("sns", endpoint_url=moto_endpoint, region_name=REGION)
    topic = sns.create_topic(Name=f"imgsync-{uuid.uuid4().hex[:8]}")["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
    other = f"{bucket}-sns"
    s3.create_bucket(Bucket=other)
    s3.put_bucket_notification_configuration(
        Bucket=other,
        NotificationConfiguration={"TopicConfigurations": [{"TopicArn": topic, "Events": ["s3:ObjectCreated:*"]}]},
    )
    s3.put_object(Bucket=other, Key="catalog/SKU 5/side view.jpg", Body=jpeg(5))
    wrapped = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=2, VisibilityTimeout=0)
    bodies = [json.loads(m["Body"]) for m in wrapped.get("Messages", [])]
    assert bodies and all(b.get("Type") == "Notification" for b in bodies), bodies
    drain(source)
    wait_for("SNS-wrapped put indexed", lambda: state(ledger, f"s3://{other}/catalog/SKU 5/side view.jpg") == "indexed")


# --- ordering: duplicates and reordering ------------------------------------------------------------


def test_duplicate_and_reordered_notifications_change_nothing(stack: Stack, s3, sqs, queue: str, bucket: str,
                                                              ledger, milvus) -> None:
    """Per-key sequencers: a duplicate and an older delete arriving after a newer put leave the image
    indexed; a newer delete (a sequencer of another length) removes it; the old put replayed then
    does not revive it."""
    key = "catalog/SKU 8/a+b é.jpg"
    s3.put_object(Bucket=bucket, Key=key, Body=jpeg(8))
    uri = f"s3://{bucket}/{key}"
    image_id = image_id_for(uri)
    encoded = quote_plus(key, safe="")
    put = {"Records": [aws_record(encoded, bucket=bucket, sequencer="00A0")]}
    source = source_for(stack, queue)

    def settled(body: dict) -> str:
        """Send ``body``, run the source, and wait until the ledger saw that request."""
        send(sqs, queue, body)
        (stats,) = drain(source)
        assert stats.published == 1 and stats.deleted == 1
        # the ledger sets the request's outcome when done: unchanged (stale, same content) or indexed (deleted)
        wait_for("request handled", lambda: (r := ledger.get(image_id)) is not None
                 and r.request_id == stats.request_id and r.outcome is not None)
        return ledger.get(image_id).state

    send(sqs, queue, put)
    drain(source)
    wait_for("first put indexed", lambda: state(ledger, uri) == "indexed")
    first = ledger.get(image_id)
    assert first.version == normalize_version("A0")

    assert settled(put) == "indexed"  # duplicate
    older_delete = {"Records": [aws_record(encoded, "ObjectRemoved:Delete", bucket=bucket, sequencer="9F")]}
    assert settled(older_delete) == "indexed"  # reordered: older than the put
    row = ledger.get(image_id)
    assert row.version == first.version and row.content_hash == first.content_hash and row.outcome == "unchanged"
    assert len(milvus.get_images(IMAGES_ALIAS, [image_id])) == 1

    newer_delete = {"Records": [aws_record(encoded, "ObjectRemoved:DeleteMarkerCreated", bucket=bucket,
                                           sequencer="0A1")]}
    assert settled(newer_delete) == "deleted"
    assert milvus.get_images(IMAGES_ALIAS, [image_id]) == []
    assert settled(put) == "deleted"  # the old put, replayed late, is stale
    assert ledger.get(image_id).version == normalize_version("A1")
    assert milvus.get_images(IMAGES_ALIAS, [image_id]) == []


# --- poison and failures -----------------------------------------------------------------------------


def test_poison_messages_are_dead_lettered_and_deleted(stack: Stack, s3, sqs, queue: str, bucket: str,
                                                       ledger) -> None:
    """Not JSON, a wrong shape and a bad record go to dead letters with a reason and leave the queue;
    the good record next to the bad one is published; the test event is dropped; nothing comes back."""
    s3.put_object(Bucket=bucket, Key="catalog/SKU 9/ok.jpg", Body=jpeg(9))
    good = aws_record(quote_plus("catalog/SKU 9/ok.jpg", safe=""), bucket=bucket, sequencer="01")
    bad = aws_record("catalog%2FSKU+9%2Fbad.jpg", bucket=bucket, sequencer="zz-not-hex")
    before = ledger.dead_letter_count()
    send(sqs, queue, "this is {not json")
    send(sqs, queue, {"Records": "not a list"})
    send(sqs, queue, {"Records": [good, bad]})
    send(sqs, queue, TEST_EVENT)
    stats = drain(SqsSource(stack.settings.model_copy(update={"sqs_wait_seconds": 1}), queue))
    assert sum(s.dead_letters for s in stats) == 3 and sum(s.published for s in stats) == 1
    assert sum(s.skipped["test_event"] for s in stats) == 1
    assert depth(sqs, queue) == 0
    assert ledger.dead_letter_count() == before + 3
    letters = ledger.dead_letter_rows(limit=3)
    assert {d["task"] for d in letters} == {TASK} and {d["reason"] for d in letters} == {"invalid_event"}
    assert any(d["body"] == "this is {not json" and "not JSON" in d["error"] for d in letters)
    assert any("sequencer" in d["error"] and "zz-not-hex" in d["body"] for d in letters)
    assert source_for(stack, queue).round().messages == 0  # never redelivered
    wait_for("good record indexed", lambda: state(ledger, f"s3://{bucket}/catalog/SKU 9/ok.jpg") == "indexed")


def test_unpublished_messages_stay_for_redelivery(stack: Stack, s3, sqs, queue: str, bucket: str, ledger) -> None:
    """Broker down: `--once` exits 3 naming IMGSYNC_BROKER_URL and the message is not deleted (it comes
    back after the visibility timeout) while a poison message of the same batch is still dead-lettered
    and deleted; with the broker back, the redelivered message is published and deleted."""
    s3.put_object(Bucket=bucket, Key="catalog/SKU 10/back.jpg", Body=jpeg(10))
    uri = f"s3://{bucket}/catalog/SKU 10/back.jpg"
    send(sqs, queue, {"Records": [aws_record(quote_plus("catalog/SKU 10/back.jpg", safe=""), bucket=bucket)]})
    send(sqs, queue, "{poison")
    before = ledger.dead_letter_count()
    # a process of its own: this one keeps its broker connection pool for the stack's broker
    env = {**stack.env, "IMGSYNC_SQS_QUEUE_URL": queue, "IMGSYNC_SQS_WAIT_SECONDS": "1",
           "IMGSYNC_SQS_VISIBILITY_TIMEOUT": "1", "IMGSYNC_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "sources", "sqs", "--once"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "IMGSYNC_BROKER_URL" in proc.stderr and "Traceback" not in proc.stderr
    assert "1 dead-lettered, 1 deleted, 1 left for redelivery" in proc.stderr
    assert depth(sqs, queue) == 1
    assert ledger.dead_letter_count() == before + 1
    assert state(ledger, uri) == "pending"  # recorded before publishing: it waits in the ledger

    time.sleep(1.2)  # the visibility timeout passes: the message is back
    (stats,) = drain(source_for(stack, queue))
    assert stats.published == 1 and stats.deleted == 1 and stats.dead_letters == 0
    assert depth(sqs, queue) == 0
    wait_for("redelivered message indexed", lambda: state(ledger, uri) == "indexed")


def test_stop_request_finishes_the_batch_in_hand(stack: Stack, sqs, queue: str, bucket: str) -> None:
    """A stop signal while a batch is being handled: the batch is published and deleted, then the loop ends."""
    for i in range(3):
        send(sqs, queue, {"Records": [aws_record(f"c%2FSKU-{i}%2Fx.jpg", bucket=bucket)]})
    published: list[int] = []
    source = source_for(stack, queue)

    def publish(settings, events) -> str:
        source.interrupt(signal.SIGTERM, None)  # arrives mid-batch
        published.append(len(events))
        return "rid"

    source.publish = publish
    totals = source.run()
    assert totals.messages == 3 and totals.deleted == 3 and published == [3]
    assert depth(sqs, queue) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_a_waiting_loop_promptly(stack: Stack, queue: str, sig: signal.Signals) -> None:
    """SIGTERM/SIGINT during a 20 s long poll: the command stops at once, exit 0, with its totals."""
    env = {**stack.env, "IMGSYNC_SQS_QUEUE_URL": queue, "IMGSYNC_SQS_WAIT_SECONDS": "20"}
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "sources", "sqs"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        seen = [proc.stderr.readline()]
        while "listening on" not in seen[-1] and seen[-1] and len(seen) < 20:  # past any warnings
            seen.append(proc.stderr.readline())
        assert "listening on" in seen[-1], "".join(seen)
        time.sleep(0.5)  # inside receive_message
        started = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert time.monotonic() - started < 5
        assert "stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- configuration errors -----------------------------------------------------------------------------


def test_missing_queue_url_is_exit_2(tmp_path: Path) -> None:
    """No IMGSYNC_SQS_QUEUE_URL and no --queue-url: exit 2 naming the setting."""
    result = CliRunner().invoke(app, ["sources", "sqs", "--once"], env={"IMGSYNC_HOME": str(tmp_path / "h")})
    assert result.exit_code == 2, result.output
    assert "IMGSYNC_SQS_QUEUE_URL" in result.output and "Traceback" not in result.output


def test_unreachable_sqs_is_exit_3(aws, tmp_path: Path, moto_endpoint: str) -> None:
    """Nothing listening, or no such queue: exit 3 naming IMGSYNC_SQS_QUEUE_URL and the URL."""
    closed = f"http://127.0.0.1:{free_port()}"
    cases = [
        (closed, f"{closed}/123456789012/imgsync"),
        (moto_endpoint, f"{moto_endpoint}/123456789012/no-such-queue-{uuid.uuid4().hex[:6]}"),
    ]
    for endpoint, url in cases:
        env = {"IMGSYNC_HOME": str(tmp_path / "h"), "IMGSYNC_S3_ENDPOINT_URL": endpoint, "IMGSYNC_S3_REGION": REGION}
        result = CliRunner().invoke(app, ["sources", "sqs", "--once", "--queue-url", url], env=env)
        assert result.exit_code == 3, result.output
        assert "IMGSYNC_SQS_QUEUE_URL" in result.output and url in result.output
        assert "Traceback" not in result.output


def test_a_queue_url_outside_aws_is_its_own_endpoint(aws, moto_endpoint: str, make_settings) -> None:
    """No IMGSYNC_S3_ENDPOINT_URL: a queue on ElasticMQ/LocalStack/moto is reached at its own URL (boto3
    alone would send to sqs.<region>.amazonaws.com); an AWS queue URL keeps boto3's endpoint."""
    import boto3

    from worker.sources.sqs import SqsSource, sqs_client

    name = f"own-endpoint-{uuid.uuid4().hex[:6]}"
    url = boto3.client("sqs", endpoint_url=moto_endpoint, region_name=REGION).create_queue(QueueName=name)["QueueUrl"]
    assert url.startswith(moto_endpoint)
    settings = make_settings(s3_endpoint_url="", s3_region=REGION)
    source = SqsSource(settings, url)
    assert source.client.meta.endpoint_url == moto_endpoint
    source.check()  # reaches the queue
    aws_client = sqs_client(settings, "https://sqs.eu-west-3.amazonaws.com/123456789012/catalog")
    assert aws_client.meta.endpoint_url.endswith(".amazonaws.com")


def test_region_comes_from_an_aws_queue_url(monkeypatch: pytest.MonkeyPatch, make_settings) -> None:
    """With no IMGSYNC_S3_REGION and no AWS region configured, an AWS queue URL's region is used."""
    from worker.sources.sqs import sqs_client

    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    client = sqs_client(make_settings(), "https://sqs.eu-west-3.amazonaws.com/123456789012/catalog")
    assert client.meta.region_name == "eu-west-3"


def test_events_carry_the_sqs_source_label(stack: Stack, bucket: str) -> None:
    """Events from this source are labelled "sqs" (the metrics label downstream)."""
    source = source_for(stack, "http://unused")
    seen: list[ImageEvent] = []
    source.publish = lambda settings, events: seen.extend(events) or "rid"
    msg = {"MessageId": "m1", "ReceiptHandle": "h1",
           "Body": json.dumps({"Records": [aws_record("c%2FSKU-1%2Fx.jpg", bucket=bucket)]})}
    source._delete = lambda messages: len(messages)  # no queue behind this one
    stats = source.handle([msg])
    assert stats.published == 1 and [e.source for e in seen] == ["sqs"]
