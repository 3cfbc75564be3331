"""S3 and MinIO event notification records, as the bucket sends them.

One record shape serves both: Amazon S3 (through SQS, directly or wrapped in an SNS envelope) and
MinIO's webhook target (``{"EventName", "Key", "Records": [...]}``) send the same ``Records`` list.
Differences handled here: S3 names events without the ``s3:`` prefix (``ObjectCreated:Put``), MinIO
with it (``s3:ObjectCreated:Put``); S3 sends no ``sequencer`` for some event types, moto never does.
Object keys stay as sent (form-encoded); decoding them is the converter's job
(:mod:`worker.sources.s3events`).

Records are validated one by one (a bad record never spoils its neighbours): envelopes keep their
records as raw JSON values.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
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
    #: hex string ordering the events of one key; None when the record has none
    sequencer: str | None = None

    @field_validator("sequencer", mode="before")
    @classmethod
    def _sequencer(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not _HEX.match(value):
            raise ValueError(f"sequencer {value!r} is not a hexadecimal string of 1 to 40 digits")
        return value


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
