"""`imgsync sources sqs` under faults, against a real moto SQS server, a real (embedded) state
database and broker URLs that do not answer: no busy loop on short polls, an outage that keeps its
messages is seen as one (empty receives while they are hidden prove nothing), the service that
failed is the one named, and credentials SQS refuses are a setting to fix."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.sources.conftest import REGION
from tests.sources.test_s3events import aws_record
from worker.errors import ConfigError, ServiceUnavailable
from worker.index.lite_server import free_port
from worker.ledger import upgrade
from worker.sources import sqs as sqs_module
from worker.sources.sqs import SqsSource


@pytest.fixture
def queue(aws, moto_endpoint: str) -> str:
    client = boto3.client("sqs", endpoint_url=moto_endpoint, region_name=REGION)
    return client.create_queue(QueueName=f"imgsync-{uuid.uuid4().hex[:10]}")["QueueUrl"]


def _settings(make_settings, moto_endpoint: str, queue_url: str, **overrides: object):  # type: ignore[no-untyped-def]
    settings = make_settings(s3_endpoint_url=moto_endpoint, s3_region=REGION, sqs_queue_url=queue_url, **overrides)
    upgrade(settings.effective_database_url)
    return settings


def test_short_polls_of_an_empty_queue_pause(make_settings, moto_endpoint: str, queue: str) -> None:
    """IMGSYNC_SQS_WAIT_SECONDS=0 on an empty queue: ~400 receive calls a second at 30% CPU; now one
    call per IDLE_PAUSE_SECONDS."""
    source = SqsSource(_settings(make_settings, moto_endpoint, queue, sqs_wait_seconds=0), queue)
    calls: list[float] = []
    real = source.client.receive_message

    def counted(**kwargs):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        return real(**kwargs)

    source.client.receive_message = counted
    thread = threading.Thread(target=source.run)
    thread.start()
    time.sleep(2.5)
    source.stopping = True
    thread.join(10)
    assert not thread.is_alive() and 2 <= len(calls) <= 4, len(calls)


def test_an_outage_that_keeps_its_messages_ends_the_source_and_names_the_database(
    make_settings, moto_endpoint: str, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state database refuses every publish: the message stays queued, hidden between attempts.
    The empty receives meanwhile reset the failure count (the backoff never grew, the source never
    ended, the failing alert never fired) and the error named the broker. Now the failed rounds
    add up to MAX_FAILED_ROUNDS and the error names IMGSYNC_DATABASE_URL."""
    client = boto3.client("sqs", endpoint_url=moto_endpoint, region_name=REGION)
    client.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": [aws_record("c%2FSKU-1%2Fa.jpg", bucket="b")]}))
    settings = _settings(make_settings, moto_endpoint, queue, sqs_wait_seconds=1, sqs_visibility_timeout=2)
    down = settings.model_copy(update={"database_url": f"postgresql+psycopg://imgsync@127.0.0.1:{free_port()}/gone"})
    source = SqsSource(down, queue, ledger=_ledger(settings))  # dead letters could be kept; the publish fails
    thread, outcome = _running(source, monkeypatch, max_failed_rounds=3)
    thread.join(40)
    source.stopping = True
    thread.join(10)
    assert outcome, "the source went on although every round failed"
    assert isinstance(outcome[0], ServiceUnavailable) and outcome[0].setting == "IMGSYNC_DATABASE_URL", outcome
    attrs = client.get_queue_attributes(QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages",
                                                                        "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    assert sum(int(v) for v in attrs.values()) == 1  # still queued: nothing lost


def _running(source: SqsSource, monkeypatch: pytest.MonkeyPatch, *, max_failed_rounds: int) -> tuple[threading.Thread, list]:
    """``source.run()`` started in a thread, ending after ``max_failed_rounds`` failed rounds with
    0.1 s backoffs: ``(thread, what it raised)``."""
    monkeypatch.setattr(sqs_module, "MAX_FAILED_ROUNDS", max_failed_rounds)
    monkeypatch.setattr(sqs_module, "BACKOFF_SECONDS", 0.1)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            source.run()
        except BaseException as exc:  # noqa: BLE001 - kept for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _ledger(settings):  # type: ignore[no-untyped-def]
    from worker.ledger import Ledger, make_engine

    return Ledger(make_engine(settings.effective_database_url))


@pytest.fixture(scope="module")
def moto_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    import os
    import urllib.request

    port = free_port()
    log = (tmp_path_factory.mktemp("moto-auth") / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)  # noqa: S310 - local
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_credentials_sqs_refuses_are_a_usage_error(aws, make_settings, moto_with_auth: str) -> None:
    """Wrong credentials were "SQS unreachable" (exit 3, moto's raw XML): now exit 2 naming them."""
    queue = f"{moto_with_auth}/123456789012/q"
    source = SqsSource(_settings(make_settings, moto_with_auth, queue), queue)
    with pytest.raises(ConfigError, match="refused the AWS credentials"):
        source.check()


def test_a_redis_broker_that_never_answers_fails_the_publish(make_settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A Redis that accepts connections and never answers held a publish (and the source's stop) for
    ever; socket timeouts end it with an error the loop backs off from."""
    import socket

    from schemas.events import ImageEvent
    from worker import celery_app
    from worker.sources.common import publish_events

    monkeypatch.setattr(celery_app, "BROKER_SOCKET_TIMEOUT", 1.0)
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        settings = make_settings(broker_url=f"redis://127.0.0.1:{mute.getsockname()[1]}/0")
        upgrade(settings.effective_database_url)
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - kombu's OperationalError or redis' TimeoutError
            publish_events(settings, [ImageEvent(uri="s3://b/SKU-1/a.jpg", sku="SKU-1")])
        assert time.monotonic() - started < 30


def test_failed_rounds_are_forgotten_once_their_messages_could_have_come_back(
    make_settings, moto_endpoint: str, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty receives do not end an outage while the failed round's messages are hidden, but once the
    visibility timeout has passed an empty queue means they were handled (here: removed elsewhere):
    a single failure days later must not add to an old count and end the source."""
    client = boto3.client("sqs", endpoint_url=moto_endpoint, region_name=REGION)
    body = json.dumps({"Records": [aws_record("c%2FSKU-1%2Fa.jpg", bucket="b")]})
    settings = _settings(make_settings, moto_endpoint, queue, sqs_wait_seconds=1, sqs_visibility_timeout=1)
    calls: list[int] = []

    def publish(_settings, events):  # type: ignore[no-untyped-def]
        calls.append(len(events))
        client.purge_queue(QueueUrl=queue)  # handled elsewhere meanwhile: it never comes back
        raise ConnectionError("broker away")

    source = SqsSource(settings, queue, publish=publish)
    client.send_message(QueueUrl=queue, MessageBody=body)
    thread, outcome = _running(source, monkeypatch, max_failed_rounds=2)
    deadline = time.monotonic() + 20
    while not calls and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(4)  # past the visibility timeout and a long poll: the failure is forgotten
    client.send_message(QueueUrl=queue, MessageBody=body)
    while len(calls) < 2 and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    time.sleep(1)
    source.stopping = True
    thread.join(10)
    assert len(calls) == 2 and outcome == [], outcome
