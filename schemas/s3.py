"""S3 and MinIO event notification records, as the bucket sends them.

One record shape serves both: Amazon S3 (through SQS, directly or wrapped in an SNS envelope) and
MinIO's webhook target (``{"EventName", "Key", "Records": [...]}``) send the same ``Records`` list.
Differences handled here: S3 names events without the ``s3:`` prefix (``ObjectCreated:Put``), MinIO
with it (``s3:ObjectCreated:Put``); S3 sends no ``sequencer`` for some event types, moto never does.
Object keys stay as sent (form-encoded); decoding them is the converter's job
(:mod:`worker.sources.s3events`).

Amazon EventBridge delivers the same changes in another shape, one event per message (bucket →
EventBridge rule → SQS target, optionally through SNS): :class:`EventBridgeS3Event` validates it and
translates it into the :class:`S3EventRecord` S3 would have sent (``Object Created`` →
``ObjectCreated:*``, ``Object Deleted`` → ``ObjectRemoved:*`` / ``LifecycleExpiration:*``, the raw key
form-encoded, the same ``sequencer``), so that one converter applies the same rules to both.
Other detail types (restore, tags, ACL, storage class) become names no rule acts on.

Records are validated one by one (a bad record never spoils its neighbours): envelopes keep their
records as raw JSON values.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote_plus

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "EventBridgeDetail",
    "EventBridgeObject",
    "EventBridgeS3Event",
    "MinioWebhookBody",
    "S3Bucket",
    "S3Entity",
    "S3EventRecord",
    "S3Notification",
    "S3Object",
    "S3TestEvent",
    "SnsEnvelope",
]

_HEX = re.compile(r"^[0-9A-Fa-f]{1,40}$")

_RECORD_CONFIG = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


def _sequencer(value: Any) -> Any:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _HEX.match(value):
        raise ValueError(f"sequencer {value!r} is not a hexadecimal string of 1 to 40 digits")
    return value


#: hex string ordering the events of one key; None when the event has none
Sequencer = Annotated[str | None, BeforeValidator(_sequencer)]


class S3Bucket(BaseModel):
    model_config = _RECORD_CONFIG

    name: str = Field(min_length=1, max_length=255)


class S3Object(BaseModel):
    """The object of a record. ``key`` is form-encoded (``/`` as ``%2F``, space as ``+``)."""

    model_config = _RECORD_CONFIG

    key: str = Field(min_length=1)
    size: int | None = None
    e_tag: str | None = Field(None, alias="eTag")
    version_id: str | None = Field(None, alias="versionId")
    sequencer: Sequencer = None


class S3Entity(BaseModel):
    model_config = _RECORD_CONFIG

    bucket: S3Bucket
    object_: S3Object = Field(alias="object")


class S3EventRecord(BaseModel):
    """One entry of ``Records``."""

    model_config = _RECORD_CONFIG

    event_name: str = Field(alias="eventName", min_length=1)
    event_time: datetime = Field(alias="eventTime")
    event_source: str | None = Field(None, alias="eventSource")
    s3: S3Entity

    @property
    def kind(self) -> str:
        """The event name without MinIO's ``s3:`` prefix: ``ObjectCreated:Put``."""
        return self.event_name.removeprefix("s3:")


class S3Notification(BaseModel):
    """An S3 notification body (an SQS message body): records kept raw, validated one by one."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    records: list[Any] = Field(alias="Records")


class MinioWebhookBody(S3Notification):
    """What MinIO's webhook target POSTs: the records plus the event name and a decoded
    ``bucket/key`` of the first record (informational; the records are what counts)."""

    event_name: str | None = Field(None, alias="EventName")
    key: str | None = Field(None, alias="Key")


class S3TestEvent(BaseModel):
    """The message S3 sends once when a notification configuration is saved (no records)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    event: Literal["s3:TestEvent"] = Field(alias="Event")
    bucket: str | None = Field(None, alias="Bucket")


class SnsEnvelope(BaseModel):
    """An SNS notification delivered to SQS without raw message delivery: the S3 JSON is in
    ``Message`` (a string)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    type: Literal["Notification"] = Field(alias="Type")
    message: str = Field(alias="Message")
    topic_arn: str | None = Field(None, alias="TopicArn")


# --- Amazon EventBridge ----------------------------------------------------------------------------

#: ``detail.reason`` of an ``Object Created`` event → the S3 event name's suffix
_CREATED_REASONS = {
    "PutObject": "Put",
    "POST Object": "Post",
    "CopyObject": "Copy",
    "CompleteMultipartUpload": "CompleteMultipartUpload",
}


class EventBridgeObject(BaseModel):
    """``detail.object`` of an EventBridge S3 event. ``key`` is the key itself (not form-encoded);
    deletes carry no size or etag."""

    model_config = _RECORD_CONFIG

    key: str = Field(min_length=1)
    size: int | None = None
    etag: str | None = None
    version_id: str | None = Field(None, alias="version-id")
    sequencer: Sequencer = None


class EventBridgeDetail(BaseModel):
    """``detail`` of an EventBridge S3 event: the bucket, the object and why it changed."""

    model_config = _RECORD_CONFIG

    bucket: S3Bucket
    object_: EventBridgeObject = Field(alias="object")
    #: ``PutObject``, ``CopyObject``, ``DeleteObject``, ``Lifecycle Expiration`` …
    reason: str | None = None
    #: ``Permanently Deleted`` or ``Delete Marker Created`` (``Object Deleted`` only)
    deletion_type: str | None = Field(None, alias="deletion-type")


class EventBridgeS3Event(BaseModel):
    """An S3 event as Amazon EventBridge delivers it (``source`` ``aws.s3``; the change in ``detail``)."""

    model_config = _RECORD_CONFIG

    source: Literal["aws.s3"]
    detail_type: str = Field(alias="detail-type", min_length=1)
    time: datetime
    detail: EventBridgeDetail

    @property
    def event_name(self) -> str:
        """The S3 notification event name of the same change.

        ``Object Created`` → ``ObjectCreated:<Put|Post|Copy|CompleteMultipartUpload>``; ``Object
        Deleted`` → ``ObjectRemoved:`` (``LifecycleExpiration:`` when a lifecycle rule expired it)
        ``Delete`` or ``DeleteMarkerCreated``; any other type → ``EventBridge:<detail-type>``, a name
        no converter rule acts on.
        """
        detail = self.detail
        if self.detail_type == "Object Created":
            reason = detail.reason or "Unknown"
            return f"ObjectCreated:{_CREATED_REASONS.get(reason, reason)}"
        if self.detail_type == "Object Deleted":
            prefix = "LifecycleExpiration" if detail.reason == "Lifecycle Expiration" else "ObjectRemoved"
            suffix = "DeleteMarkerCreated" if detail.deletion_type == "Delete Marker Created" else "Delete"
            return f"{prefix}:{suffix}"
        return f"EventBridge:{self.detail_type}"

    def to_record(self) -> S3EventRecord:
        """The ``Records`` entry S3 would have sent for the same change: same bucket, sequencer and
        time, the key form-encoded as S3 encodes record keys (decoding gives the raw key back exactly;
        pydantic has already refused keys that are not valid Unicode)."""
        obj = self.detail.object_
        return S3EventRecord(
            event_name=self.event_name,
            event_time=self.time,
            event_source=self.source,
            s3=S3Entity(
                bucket=self.detail.bucket,
                object_=S3Object(
                    key=quote_plus(obj.key, safe=""),
                    size=obj.size,
                    e_tag=obj.etag,
                    version_id=obj.version_id,
                    sequencer=obj.sequencer,
                ),
            ),
        )
