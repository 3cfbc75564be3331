"""S3 events delivered by Amazon EventBridge (bucket → rule → SQS, optionally through SNS) → image
events: the same uri, SKU, action and version as the ``Records`` entry of the same change, skips for
non-content detail types, invalid events set apart. Samples follow the AWS documentation's
"EventBridge event message structure" examples (raw keys, ``version-id``, ``deletion-type``); the last
test sends one such event to a real moto SQS queue and follows it into the index."""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote_plus

import boto3
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from config.settings import Settings
from schemas.events import Action, image_id_for, normalize_version
from schemas.s3 import EventBridgeS3Event
from tests.sources.conftest import REGION
from tests.sources.test_s3events import DEFAULT_RULES, aws_record, one, sns_envelope
from tests.sources.test_sqs import drain, jpeg, send, source_for, state, wait_for
from tests.stack import Stack
from worker.cli.indexing import IMAGE_SUFFIXES
from worker.ledger import Ledger, make_engine
from worker.sources.s3events import (
    InvalidNotification,
    KeyRules,
    Skip,
    convert_document,
    parse_notification,
)

# --- samples ------------------------------------------------------------------------------------


def eventbridge_event(key: str, detail_type: str = "Object Created", *, bucket: str = "catalog-bucket",
                      sequencer: str | None = "0055AED6DCD90281E5", time: str = "2026-11-24T10:00:00Z",
                      reason: str | None = None, deletion_type: str | None = None,
                      version_id: str | None = "IYV3p45BT0ac8hjHg1houSdS1a.Mc8cE") -> dict:
    """An S3 event as EventBridge sends it (AWS's documented examples); ``key`` is the raw key. A delete's
    object has no size or etag; ``reason`` defaults to PutObject / DeleteObject; ``version_id`` None:
    an unversioned bucket."""
    obj: dict = {"key": key}
    if version_id is not None:
        obj["version-id"] = version_id
    if detail_type != "Object Deleted":
        obj.update({"size": 5, "etag": "b1946ac92492d2347c6235b4d2611184"})
    if sequencer is not None:
        obj["sequencer"] = sequencer
    detail: dict = {"version": "0", "bucket": {"name": bucket}, "object": obj, "request-id": "N4N7GDK58NMKJ12R",
                    "requester": "123456789012", "source-ip-address": "1.2.3.4"}
    if detail_type == "Object Created":
        detail["reason"] = reason or "PutObject"
    elif detail_type == "Object Deleted":
        detail["reason"] = reason or "DeleteObject"
        detail["deletion-type"] = deletion_type or "Permanently Deleted"
    elif reason is not None:
        detail["reason"] = reason
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": "111122223333",
        "time": time,
        "region": "ca-central-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": detail,
    }


def records_twin(key: str, event: str = "ObjectCreated:Put", **kwargs) -> dict:
    """The S3 ``Records`` notification of the same change (key form-encoded, as S3 sends it)."""
    return {"Records": [aws_record(quote_plus(key, safe=""), event, **kwargs)]}


# --- created -------------------------------------------------------------------------------------

_SEGMENT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"), min_size=1, max_size=12
)

RAW_KEYS = [
    # (raw key as EventBridge sends it, sku)
    ("catalog/SKU 1/front view.jpg", "SKU 1"),
    ("catalog/SKU+2/a+b.jpg", "SKU+2"),
    ("raw/SKU-3/2023-08-08T14:03:40.532432.png", "SKU-3"),
    ("catalog/SKU-4/100% cotton%2F.jpg", "SKU-4"),  # '%' is literal: never unquoted
    ("商品/写真 1.JPG", "商品"),
    ("cat/café/été 😀 +:x.webp", "café"),
]


@pytest.mark.parametrize(("key", "sku"), RAW_KEYS)
def test_object_created_is_an_upsert_of_the_raw_key(key: str, sku: str) -> None:
    """Object Created → upsert of s3://bucket/<raw key> (space, '+', ':', '%', non-ASCII kept), its SKU,
    the sequencer's version and the envelope's time — the same event as the Records entry of that change."""
    (ev,) = one(eventbridge_event(key)).events
    assert ev.uri == f"s3://catalog-bucket/{key}"
    assert ev.sku == sku and ev.action is Action.upsert and ev.source == "sqs"
    assert ev.version == normalize_version("0055AED6DCD90281E5")
    assert ev.event_time.isoformat() == "2026-11-24T10:00:00+00:00"
    assert one(records_twin(key)).events == [ev]


@pytest.mark.parametrize("reason", ["PutObject", "POST Object", "CopyObject", "CompleteMultipartUpload"])
def test_every_created_reason_is_an_upsert(reason: str) -> None:
    """Each Object Created reason (put, POST, copy, multipart) maps to an ObjectCreated:* upsert."""
    event = eventbridge_event("c/SKU-1/a.jpg", reason=reason)
    assert EventBridgeS3Event.model_validate(event).event_name.startswith("ObjectCreated:")
    assert [e.action for e in one(event).events] == [Action.upsert]


@hsettings(max_examples=100, deadline=None)
@given(
    prefix=st.lists(_SEGMENT, max_size=3),
    sku=_SEGMENT.filter(lambda s: s == s.strip()),
    stem=_SEGMENT,
    suffix=st.sampled_from(sorted(IMAGE_SUFFIXES)),
)
def test_any_raw_key_is_kept_as_is(prefix: list[str], sku: str, stem: str, suffix: str) -> None:
    """Whatever a raw key holds (escapes, '+', '%', ':' included), the uri names exactly that key, with its SKU."""
    key = "/".join([*prefix, sku, stem + suffix])
    (ev,) = one(eventbridge_event(key)).events
    assert ev.uri == f"s3://catalog-bucket/{key}"
    assert ev.sku == sku


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("catalog/SKU-1/", Skip.folder),
        ("catalog/SKU-1/notes.txt", Skip.not_image),
        ("front.jpg", Skip.no_sku),
        ("thumbs/SKU-1/front.jpg", Skip.ignored_prefix),
    ],
)
def test_key_rules_are_the_records_rules(key: str, reason: Skip) -> None:
    """Folders, non-images, keys without a SKU and ignored prefixes skip EventBridge events with the same reason."""
    rules = KeyRules.from_settings(Settings(_env_file=None, s3_ignore_prefixes="thumbs/"))  # type: ignore[call-arg]
    conv = one(eventbridge_event(key), rules)
    assert conv.events == [] and conv.skipped == {reason.value: 1}


# --- deleted and other detail types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("deletion_type", "reason", "twin"),
    [
        ("Permanently Deleted", "DeleteObject", "ObjectRemoved:Delete"),
        ("Delete Marker Created", "DeleteObject", "ObjectRemoved:DeleteMarkerCreated"),
        ("Permanently Deleted", "Lifecycle Expiration", "LifecycleExpiration:Delete"),
        ("Delete Marker Created", "Lifecycle Expiration", "LifecycleExpiration:DeleteMarkerCreated"),
    ],
)
def test_object_deleted_is_a_delete(deletion_type: str, reason: str, twin: str) -> None:
    """Object Deleted (permanently or by a delete marker, by a request or by lifecycle) → delete of the
    created image, named as the Records entry of the same change; on a versioned bucket a version
    deleted for good (not a delete marker) has the key read again, as its Records twin does."""
    key = "catalog/SKU 1/a+b:c.jpg"
    event = eventbridge_event(key, "Object Deleted", deletion_type=deletion_type, reason=reason, version_id=None)
    assert EventBridgeS3Event.model_validate(event).event_name == twin
    (gone,) = one(event).events
    (made,) = one(eventbridge_event(key)).events
    assert gone.action is Action.delete and gone.image_id == made.image_id and gone.sku == "SKU 1"
    assert one(records_twin(key, twin, version_id=None)).events == [gone]

    versioned = eventbridge_event(key, "Object Deleted", deletion_type=deletion_type, reason=reason)
    (one_version,) = one(versioned).events
    expected = Action.delete if deletion_type == "Delete Marker Created" else Action.upsert
    assert one_version.action is expected and one_version.image_id == made.image_id
    assert one(records_twin(key, twin, version_id="IYV3p45BT0ac8hjHg1houSdS1a.Mc8cE")).events == [one_version]


@pytest.mark.parametrize(
    "detail_type",
    [
        "Object Restore Initiated",
        "Object Restore Completed",
        "Object Restore Expired",
        "Object Tags Added",
        "Object Tags Deleted",
        "Object ACL Updated",
        "Object Storage Class Changed",
        "Object Access Tier Changed",
        "ObjectCreated:Put",  # not an EventBridge type: never read as an S3 event name
    ],
)
def test_non_content_detail_types_are_skipped_and_counted(detail_type: str) -> None:
    """Restore, tags, ACL, storage class and unknown detail types: skipped as other_event, never invalid."""
    conv = one(eventbridge_event("catalog/SKU-1/a.jpg", detail_type, reason="RestoreObject"))
    assert conv.events == [] and conv.skipped == {Skip.other_event.value: 1}


# --- ordering ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("0055AED6DCD90281E5", "0055AED6DCD90281E6"),
        ("FF", "0100"),
        ("617f08299329d189", "617F0837B476E463"),
        ("9", "A"),
    ],
)
def test_an_older_sequencer_after_a_newer_one_compares_lower(older: str, newer: str) -> None:
    """Received newest first, the older EventBridge event still has the lower version, and each version
    equals the Records entry's for the same sequencer, so the two formats order against each other."""
    key = "catalog/SKU 1/a.jpg"
    (new,) = one(eventbridge_event(key, sequencer=newer)).events
    (old,) = one(eventbridge_event(key, "Object Deleted", sequencer=older)).events
    assert old.version < new.version
    assert old.version == one(records_twin(key, "ObjectRemoved:Delete", sequencer=older)).events[0].version
    assert new.version == one(records_twin(key, sequencer=newer)).events[0].version


def test_no_sequencer_falls_back_to_the_event_time() -> None:
    """Without a sequencer the version is the envelope time in ns, as for a Records entry without one."""
    (ev,) = one(eventbridge_event("c/S/a.jpg", sequencer=None, time="2026-11-24T17:29:38Z")).events
    assert ev.version == normalize_version(1795541378000000000)
    assert [ev] == one(records_twin("c/S/a.jpg", sequencer=None, time="2026-11-24T17:29:38Z")).events


# --- SNS --------------------------------------------------------------------------------------------


def test_eventbridge_inside_an_sns_envelope() -> None:
    """An EventBridge event wrapped in SNS gives the same event, or the same skip, as the plain one."""
    created = eventbridge_event("catalog/SKU 1/a+b.jpg")
    assert one(sns_envelope(created)).events == one(created).events != []
    tagged = sns_envelope(eventbridge_event("catalog/SKU 1/a+b.jpg", "Object Tags Added"))
    assert one(tagged).skipped == {Skip.other_event.value: 1}


# --- invalid ----------------------------------------------------------------------------------------


def _without(path: str) -> dict:
    event = eventbridge_event("catalog/SKU-1/a.jpg")
    *parents, last = path.split(".")
    node = event
    for name in parents:
        node = node[name]
    del node[last]
    return event


def _with(path: str, value: object) -> dict:
    event = eventbridge_event("catalog/SKU-1/a.jpg")
    *parents, last = path.split(".")
    node = event
    for name in parents:
        node = node[name]
    node[last] = value
    return event


@pytest.mark.parametrize(
    ("event", "where"),
    [
        (_without("detail"), "detail"),
        (_without("detail.bucket"), "detail.bucket"),
        (_without("detail.object"), "detail.object"),
        (_without("detail.object.key"), "detail.object.key"),
        (_without("detail-type"), "detail-type"),
        (_without("time"), "time"),
        (_with("detail.object.key", ""), "detail.object.key"),
        (_with("detail.bucket", {"name": ""}), "detail.bucket.name"),
        (_with("detail.object.sequencer", "not-hex"), "sequencer"),
        (_with("detail", "a string"), "detail"),
        (_with("detail.object.key", "c/SKU-1/\ud800.jpg"), "detail.object.key"),  # not valid Unicode
        (_with("detail.object.key", "c/SKU\n1/a.jpg"), "sku"),
    ],
)
def test_a_malformed_event_is_invalid_with_a_reason(event: dict, where: str) -> None:
    """Missing or bad detail/bucket/object/key/time/sequencer: one invalid record naming the field, no
    event, no exception."""
    conv = convert_document(event, DEFAULT_RULES, "sqs")
    assert conv.events == [] and not conv.skipped
    (bad,) = conv.invalid
    assert bad.index == 0 and where in bad.error, bad.error
    assert json.loads(bad.body())["source"] == "aws.s3"


def test_an_event_of_another_service_is_not_a_notification() -> None:
    """An EventBridge event whose source is not aws.s3 is not an S3 notification: InvalidNotification naming it."""
    event = eventbridge_event("c/SKU-1/a.jpg")
    event["source"] = "aws.ec2"
    with pytest.raises(InvalidNotification, match="aws.ec2"):
        parse_notification(json.dumps(event), DEFAULT_RULES, "sqs")


# --- end to end through a real SQS queue ----------------------------------------------------------


@pytest.fixture(scope="module")
def ledger(stack: Stack) -> Ledger:
    return Ledger(make_engine(stack.settings.effective_database_url))


@pytest.fixture
def queue_and_bucket(aws, moto_endpoint: str) -> tuple:
    """boto3 SQS and S3 clients on the moto server, a fresh queue's URL and a fresh bucket."""
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name=REGION)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    name = f"imgsync-eb-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    return sqs, s3, sqs.create_queue(QueueName=name)["QueueUrl"], name


def test_eventbridge_message_on_a_real_queue_is_indexed(stack: Stack, queue_and_bucket, ledger: Ledger) -> None:
    """EventBridge events sent straight to a moto SQS queue: a create is published and indexed under the
    raw key's uri with its sequencer's version, a tag change is skipped, a malformed one is dead-lettered,
    and all three leave the queue."""
    sqs, s3, queue, bucket = queue_and_bucket
    key = "catalog/SKU 11/2023-08-08T14:03:40.5+x é.jpg"
    s3.put_object(Bucket=bucket, Key=key, Body=jpeg(11))
    send(sqs, queue, eventbridge_event(key, bucket=bucket, sequencer="617f08299329d189"))
    send(sqs, queue, eventbridge_event(key, "Object Tags Added", bucket=bucket))
    broken = eventbridge_event(key, bucket=bucket)
    del broken["detail"]["object"]
    send(sqs, queue, broken)
    before = ledger.dead_letter_count()
    stats = drain(source_for(stack, queue))
    assert sum(s.messages for s in stats) == 3 and sum(s.deleted for s in stats) == 3
    assert sum(s.published for s in stats) == 1 and sum(s.dead_letters for s in stats) == 1
    assert sum(s.skipped[Skip.other_event.value] for s in stats) == 1
    assert ledger.dead_letter_count() == before + 1
    uri = f"s3://{bucket}/{key}"
    wait_for(f"{uri} indexed", lambda: state(ledger, uri) == "indexed")
    row = ledger.get(image_id_for(uri))
    assert row.sku == "SKU 11" and row.version == normalize_version("617F08299329D189")
