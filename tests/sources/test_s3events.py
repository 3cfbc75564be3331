"""S3 / MinIO notification records → image events: key decoding, SKU pattern, skips, actions,
ordering, envelopes and invalid input. Samples follow recorded payloads: the AWS documentation's
S3 example, moto 5.2.5's records (no sequencer), and MinIO's webhook body as its
``internal/event/target/webhook.go`` builds it (``Key`` decoded, record keys ``url.QueryEscape``d)."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from urllib.parse import quote_plus

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from config.settings import Settings
from schemas.events import Action, normalize_version
from schemas.s3 import S3EventRecord
from worker.cli.indexing import IMAGE_SUFFIXES
from worker.sources.s3events import (
    InvalidNotification,
    KeyRules,
    Skip,
    action_for,
    convert_document,
    decode_key,
    parse_notification,
    version_for,
)

DEFAULT_RULES = KeyRules.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]

# --- samples ------------------------------------------------------------------------------------


def aws_record(key: str, event: str = "ObjectCreated:Put", *, bucket: str = "catalog-bucket",
               sequencer: str | None = "0055AED6DCD90281E5", time: str = "2026-11-24T10:00:00.000Z",
               version_id: str | None = "096fKKXTRTtl3on89fVO.nfljtsv6qko") -> dict:
    """A record shaped like AWS's documented s3:ObjectCreated:Put example (``key`` already encoded);
    ``version_id`` None: an unversioned bucket's record (no ``versionId``)."""
    obj: dict = {"key": key, "size": 1024, "eTag": "d41d8cd98f00b204e9800998ecf8427e"}
    if version_id is not None:
        obj["versionId"] = version_id
    if sequencer is not None:
        obj["sequencer"] = sequencer
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": time,
        "eventName": event,
        "userIdentity": {"principalId": "AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810",
                             "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "testConfigRule",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                       "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
    }


def minio_body(key: str, event: str = "s3:ObjectCreated:Put", *, bucket: str = "catalog",
               sequencer: str = "17E3A3DC10F32B0C", time: str = "2026-11-24T10:00:00.158Z") -> dict:
    """A MinIO webhook body: ``Key`` is ``bucket/<decoded key>``, the record's key is
    ``url.QueryEscape``d (``/`` → ``%2F``, space → ``+``), event names carry ``s3:``. A delete's
    object has no size, eTag or content type (``omitempty``)."""
    obj: dict = {"key": quote_plus(key, safe=""), "sequencer": sequencer}
    if "ObjectCreated" in event:
        obj.update({"size": 52311, "eTag": "5d8d6616e52abb2a041be799f674c228", "contentType": "image/jpeg",
                    "userMetadata": {"content-type": "image/jpeg"}})
    return {
        "EventName": event,
        "Key": f"{bucket}/{key}",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "awsRegion": "",
                "eventTime": time,
                "eventName": event,
                "userIdentity": {"principalId": "minioadmin"},
                "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "172.22.0.1"},
                "responseElements": {
                    "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
                    "x-amz-request-id": "17E3A3DC0FB2EF4F",
                    "x-minio-deployment-id": "bf181084-21a1-4dbc-ae17-802c391e39f2",
                    "x-minio-origin-endpoint": "http://172.22.0.2:9000",
                },
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "Config",
                    "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"},
                               "arn": f"arn:aws:s3:::{bucket}"},
                    "object": obj,
                },
                "source": {"host": "172.22.0.1", "port": "",
                           "userAgent": "MinIO (linux; amd64) minio-go/v7.0.61 MinIO Console/(dev)"},
            }
        ],
    }


def sns_envelope(inner: dict) -> dict:
    """An SNS notification as SQS receives it without raw message delivery."""
    return {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:catalog-events",
        "Subject": "Amazon S3 Notification",
        "Message": json.dumps(inner),
        "Timestamp": "2026-11-24T10:00:00.200Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-EXAMPLE.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=EXAMPLE",
    }


TEST_EVENT = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-24T10:00:00.089Z",
              "Bucket": "catalog-bucket", "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3e"}


def one(doc: dict, rules: KeyRules = DEFAULT_RULES, source: str = "sqs"):
    conv = convert_document(doc, rules, source)
    assert not conv.invalid, conv.invalid
    return conv


# --- keys ---------------------------------------------------------------------------------------

ODD_KEYS = [
    # (encoded as S3 sends it, decoded key, sku)
    ("catalog%2FSKU+1%2Ffront+view.jpg", "catalog/SKU 1/front view.jpg", "SKU 1"),
    ("catalog%2FSKU%2B2%2Fa%2Bb.jpg", "catalog/SKU+2/a+b.jpg", "SKU+2"),
    ("catalog%2FSKU-3%2F100%25+cotton.png", "catalog/SKU-3/100% cotton.png", "SKU-3"),
    ("%E5%95%86%E5%93%81%2F%E5%86%99%E7%9C%9F+1.JPG", "商品/写真 1.JPG", "商品"),
    ("a%2Fb%2Fc%2Fd%2Fe%2Ff%2Fg%2FSKU-9%2Fdeep.webp", "a/b/c/d/e/f/g/SKU-9/deep.webp", "SKU-9"),
    ("SKU-4/slash-not-encoded.jpeg", "SKU-4/slash-not-encoded.jpeg", "SKU-4"),
    ("cat%2Fcaf%C3%A9%2F%C3%A9t%C3%A9+%F0%9F%98%80.jpg", "cat/café/été 😀.jpg", "café"),
]


@pytest.mark.parametrize(("encoded", "key", "sku"), ODD_KEYS)
def test_odd_keys_decode_to_the_stored_key_and_its_sku(encoded: str, key: str, sku: str) -> None:
    """Form-encoded keys (+ as space, %2B as plus, UTF-8 escapes, deep prefixes) give the stored key's uri and SKU."""
    ev = one({"Records": [aws_record(encoded)]}).events[0]
    assert ev.uri == f"s3://catalog-bucket/{key}"
    assert ev.sku == sku
    assert ev.action is Action.upsert and ev.source == "sqs"


_SEGMENT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"), min_size=1, max_size=12
)


@hsettings(max_examples=200, deadline=None)
@given(
    prefix=st.lists(_SEGMENT, max_size=4),
    sku=_SEGMENT.filter(lambda s: s == s.strip()),
    stem=_SEGMENT,
    suffix=st.sampled_from(sorted(IMAGE_SUFFIXES)),
)
def test_any_key_round_trips_through_form_encoding(prefix: list[str], sku: str, stem: str, suffix: str) -> None:
    """Whatever a key holds, quote_plus-encoding (moto, MinIO) then decoding gives it back, with its SKU."""
    key = "/".join([*prefix, sku, stem + suffix])
    encoded = quote_plus(key, safe="")
    assert decode_key(encoded) == key
    ev = one({"Records": [aws_record(encoded)]}).events[0]
    assert ev.uri == f"s3://catalog-bucket/{key}"
    assert ev.sku == sku


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        ("catalog%2FSKU-1%2F", Skip.folder),  # console "folder" placeholder
        ("catalog%2FSKU-1%2Fnotes.txt", Skip.not_image),
        ("catalog%2FSKU-1%2Fno-suffix", Skip.not_image),
        ("front.jpg", Skip.no_sku),  # no SKU level: the pattern cannot place it
        ("thumbs%2FSKU-1%2Ffront.jpg", Skip.ignored_prefix),
    ],
)
def test_keys_outside_the_catalog_are_skipped_and_counted(encoded: str, reason: Skip) -> None:
    """Folders, non-images, ignored prefixes and keys without a SKU level: skipped with a reason, not invalid."""
    rules = KeyRules.from_settings(Settings(_env_file=None, s3_ignore_prefixes="thumbs/,tmp/"))  # type: ignore[call-arg]
    conv = one({"Records": [aws_record(encoded)]}, rules)
    assert conv.events == []
    assert conv.skipped == {reason.value: 1}


def test_custom_key_pattern_places_the_sku() -> None:
    """IMGSYNC_S3_KEY_PATTERN's `sku` group decides the SKU; a key it does not match is skipped."""
    rules = KeyRules.from_settings(
        Settings(_env_file=None, s3_key_pattern=r"^products/(?P<sku>\d+)-[^/]+$")  # type: ignore[call-arg]
    )
    conv = one({"Records": [aws_record("products%2F123-front.jpg"), aws_record("other%2F123-front.jpg")]}, rules)
    assert [e.sku for e in conv.events] == ["123"]
    assert conv.skipped == {Skip.no_sku.value: 1}


# --- actions and envelopes ----------------------------------------------------------------------


def test_a_key_with_a_nul_is_an_invalid_record_on_its_own() -> None:
    """A key that decodes to a NUL (which no ledger can store) is an invalid record; its message's
    other records are still converted."""
    conv = convert_document({"Records": [aws_record("c%2FSKU-1%2Fbad%00.jpg"), aws_record("c%2FSKU-1%2Fgood.jpg")]}, DEFAULT_RULES, "sqs")
    assert [e.uri for e in conv.events] == ["s3://catalog-bucket/c/SKU-1/good.jpg"]
    assert len(conv.invalid) == 1 and "NUL" in conv.invalid[0].error


@pytest.mark.parametrize(
    ("name", "action"),
    [
        ("ObjectCreated:Put", Action.upsert),
        ("ObjectCreated:Post", Action.upsert),
        ("ObjectCreated:Copy", Action.upsert),
        ("ObjectCreated:CompleteMultipartUpload", Action.upsert),
        ("s3:ObjectCreated:Put", Action.upsert),
        ("ObjectRemoved:Delete", Action.delete),
        ("ObjectRemoved:DeleteMarkerCreated", Action.delete),
        ("s3:ObjectRemoved:Delete", Action.delete),
        ("LifecycleExpiration:Delete", Action.delete),
        ("ObjectAccessed:Get", None),
        ("s3:ObjectAccessed:Head", None),
        ("ObjectTagging:Put", None),
        ("s3:ObjectCreated:PutTagging", None),  # MinIO: tags, retention, legal hold leave the bytes alone
        ("s3:ObjectCreated:DeleteTagging", None),
        ("s3:ObjectCreated:PutRetention", None),
        ("s3:ObjectCreated:PutLegalHold", None),
        ("ObjectRestore:Completed", None),
        ("s3:TestEvent", None),
    ],
)
def test_event_names_map_to_actions(name: str, action: Action | None) -> None:
    """Created → upsert, Removed/expired → delete (with or without MinIO's s3: prefix), anything else → none."""
    assert action_for(name) == action
    conv = one({"Records": [aws_record("c%2FSKU-1%2Fa.jpg", name, version_id=None)]})
    if action is None:
        assert conv.events == [] and conv.skipped == {Skip.other_event.value: 1}
    else:
        assert [e.action for e in conv.events] == [action]


@pytest.mark.parametrize(
    ("name", "version_id", "action"),
    [
        ("ObjectRemoved:Delete", "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY", Action.upsert),  # one version deleted for good
        ("s3:ObjectRemoved:Delete", "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY", Action.upsert),
        ("LifecycleExpiration:Delete", "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY", Action.upsert),  # noncurrent expiry
        ("ObjectRemoved:Delete", "null", Action.delete),  # versioning suspended: the null version
        ("ObjectRemoved:Delete", "", Action.delete),
        ("ObjectRemoved:DeleteMarkerCreated", "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY", Action.delete),
        ("LifecycleExpiration:DeleteMarkerCreated", "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY", Action.delete),
    ],
)
def test_a_deleted_version_rereads_the_key(name: str, version_id: str, action: Action) -> None:
    """On a versioned bucket a Delete naming a versionId removed one version (an expired noncurrent one,
    a delete marker): the key may still hold an object, so it is read again (upsert, same image); a
    delete marker, or no version id, is a delete."""
    assert action_for(name, version_id) == action
    (made,) = one({"Records": [aws_record("c%2FSKU-1%2Fa.jpg")]}).events
    (event,) = one({"Records": [aws_record("c%2FSKU-1%2Fa.jpg", name, version_id=version_id, sequencer="0055AED6DCD90281F0")]}).events
    assert event.action is action and event.image_id == made.image_id and event.version > made.version


def test_test_event_is_skipped_plain_and_in_sns() -> None:
    """s3:TestEvent (no Records) produces nothing, also inside an SNS envelope."""
    for doc in (TEST_EVENT, sns_envelope(TEST_EVENT)):
        conv = one(doc)
        assert conv.events == [] and conv.skipped == {Skip.test_event.value: 1}


def test_sns_envelope_is_unwrapped() -> None:
    """An SNS-wrapped S3 notification gives the same events as the plain one."""
    inner = {"Records": [aws_record("c%2FSKU-1%2Fa+b.jpg")]}
    assert one(sns_envelope(inner)).events == one(inner).events


def test_minio_webhook_body() -> None:
    """MinIO's body: the record's %2F-escaped key is decoded, s3:-prefixed names understood, sequencer kept."""
    conv = one(minio_body("products/SKU 7/front view+1.jpg"), source="webhook")
    (ev,) = conv.events
    assert ev.uri == "s3://catalog/products/SKU 7/front view+1.jpg"
    assert ev.sku == "SKU 7" and ev.source == "webhook" and ev.action is Action.upsert
    assert ev.version == normalize_version("17E3A3DC10F32B0C")
    assert ev.event_time == datetime(2026, 11, 24, 10, 0, 0, 158000, tzinfo=UTC)
    (gone,) = one(minio_body("products/SKU 7/front view+1.jpg", "s3:ObjectRemoved:Delete")).events
    assert gone.action is Action.delete and gone.image_id == ev.image_id


def test_moto_record_without_sequencer_uses_event_time_nanoseconds() -> None:
    """No sequencer (moto): the version is the event time in ns, so later events are newer."""
    first = one({"Records": [aws_record("c%2FS%2Fa.jpg", sequencer=None, time="2026-11-24T17:29:38.833Z")]}).events[0]
    later = one({"Records": [aws_record("c%2FS%2Fa.jpg", sequencer=None, time="2026-11-24T17:29:38.847Z")]}).events[0]
    assert first.version == normalize_version(1795541378833000000)
    assert later.version > first.version


# --- ordering -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("0055AED6DCD90281E5", "0055AED6DCD90281E6"),
        ("FF", "0100"),  # different lengths: left padding makes it numeric
        ("0055AED6DCD90281E5", "55AED6DCD90281E6"),
        ("9", "A"),
        ("17e3a3dc10f32b0c", "17E3A3DC10F32B0D"),  # case does not matter
    ],
)
def test_sequencers_order_as_aws_says(older: str, newer: str) -> None:
    """Sequencers compare after left zero-padding (AWS's rule): the newer one has the greater version."""
    v_old = version_for(S3EventRecord.model_validate(aws_record("k", sequencer=older)))
    v_new = version_for(S3EventRecord.model_validate(aws_record("k", sequencer=newer)))
    assert normalize_version(v_old) < normalize_version(v_new)


@given(a=st.integers(0, 16**20 - 1), b=st.integers(0, 16**20 - 1), pad_a=st.integers(0, 4), pad_b=st.integers(0, 4))
def test_padded_sequencer_order_is_numeric_order(a: int, b: int, pad_a: int, pad_b: int) -> None:
    """Any two hex sequencers, with any leading zeros, order like the numbers they write."""
    va = normalize_version("0" * pad_a + f"{a:X}")
    vb = normalize_version("0" * pad_b + f"{b:x}")
    assert (va < vb) == (a < b) and (va == vb) == (a == b)


# --- invalid input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b"\xff\xfe garbage",
        b"[1, 2, 3]",
        b'"a string"',
        b'{"Records": "not a list"}',
        b'{"hello": "world"}',
        b'{"Type": "Notification", "Message": "not json"}',
        json.dumps(sns_envelope(sns_envelope(TEST_EVENT))).encode(),
        b"[" * 20000 + b"]" * 20000,  # nested past the parser's depth: RecursionError escaped
        json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": ["x"]}).encode(),  # ValidationError escaped
    ],
)
def test_message_that_is_no_notification_is_invalid(body: bytes) -> None:
    """Not JSON, not an object, no Records/SNS/test event, or nested envelopes: InvalidNotification with why."""
    with pytest.raises(InvalidNotification) as info:
        parse_notification(body, DEFAULT_RULES, "sqs")
    assert str(info.value)


def test_bad_records_are_set_apart_and_good_ones_kept() -> None:
    """A record failing validation is returned as invalid with its index; its neighbours still become events."""
    good = aws_record("c%2FSKU-1%2Fa.jpg")
    no_key = copy.deepcopy(good)
    del no_key["s3"]["object"]["key"]
    bad_seq = aws_record("c%2FSKU-1%2Fb.jpg", sequencer="not-hex")
    bad_time = aws_record("c%2FSKU-1%2Fc.jpg", time="yesterday")
    ctrl_sku = aws_record("c%2FSKU%0A1%2Fd.jpg")  # a newline in the SKU: the event contract refuses it
    bad_utf8 = aws_record("c%2FSKU-1%2F%FF.jpg")
    long_sku = aws_record(f"c%2F{'S' * 300}%2Fe.jpg")
    conv = convert_document(
        {"Records": [good, no_key, bad_seq, "a string", bad_time, ctrl_sku, bad_utf8, long_sku]}, DEFAULT_RULES, "sqs"
    )
    assert [e.uri for e in conv.events] == ["s3://catalog-bucket/c/SKU-1/a.jpg"]
    assert [bad.index for bad in conv.invalid] == [1, 2, 3, 4, 5, 6, 7]
    errors = {bad.index: bad.error for bad in conv.invalid}
    assert "key" in errors[1] and "sequencer" in errors[2] and "sku" in errors[5] and "UTF-8" in errors[6]
    assert json.loads(conv.invalid[0].body())["s3"]["object"].get("key") is None


def test_default_pattern_is_the_documented_layout() -> None:
    """The default IMGSYNC_S3_KEY_PATTERN reads <prefix>/<sku>/<file> and <sku>/<file>."""
    pattern = re.compile(Settings(_env_file=None).s3_key_pattern)  # type: ignore[call-arg]
    assert pattern.search("a/b/SKU/f.jpg").group("sku") == "SKU"
    assert pattern.search("SKU/f.jpg").group("sku") == "SKU"
    assert pattern.search("f.jpg") is None
