"""S3 / MinIO event records → :class:`~schemas.events.ImageEvent`: the part the SQS and webhook
sources share.

Shapes understood: an S3 ``Records`` body, MinIO's webhook body, S3's ``s3:TestEvent``, an Amazon
EventBridge S3 event (``"source": "aws.s3"``), and any of these inside an SNS envelope. An EventBridge
event is first translated into the ``Records`` entry S3 sends for the same change
(:meth:`schemas.s3.EventBridgeS3Event.to_record`), so every rule below applies to it unchanged:
``Object Created`` is an upsert, ``Object Deleted`` a delete, other detail types (restore, tags, ACL,
storage class) are skipped as ``other_event``; its key, sent unencoded, gives the same uri, and its
``sequencer`` the same version, as the ``Records`` entry of the same change. An EventBridge event from
another service is not a notification; one from S3 with fields missing is an invalid record.

Rules, in the order they apply to a record:

- **Event kind.** ``ObjectCreated:*`` is an upsert; ``ObjectRemoved:*`` (``Delete``,
  ``DeleteMarkerCreated``) and ``LifecycleExpiration:*`` (an expiry deletes the object just the same)
  are deletes, except a ``Delete`` that names a ``versionId``: on a versioned bucket that is one
  version deleted for good (a noncurrent version expired, a delete marker removed), and the object
  may well still be there. It becomes an upsert, which reads the key's current version: unchanged
  content costs no forward pass, an older version that became current is encoded, a restored object
  comes back, and a key with no version left fails as ``not_found`` (its vector removed). Other
  kinds (``ObjectAccessed``, tagging (MinIO's ``ObjectCreated:PutTagging`` and the like too), ACL,
  restore, replication) and S3's ``s3:TestEvent`` are
  skipped. The ``s3:`` prefix MinIO puts on record names is ignored.
- **Key.** Record keys are form-encoded (``/`` as ``%2F``, space as ``+``, ``+`` as ``%2B``, UTF-8
  percent-encoded): decoded with :func:`urllib.parse.unquote_plus`; a key that is not valid UTF-8
  once decoded makes the record invalid. The uri is ``s3://<bucket>/<decoded key>``.
- **Skips** (counted by reason, never dead-lettered: they are valid bucket objects outside the
  catalog layout): a key ending in ``/`` (a console "folder"), a key under one of
  ``IMGSYNC_S3_IGNORE_PREFIXES`` (compared with the decoded key), a file name whose suffix is not an
  image suffix, a key the ``IMGSYNC_S3_KEY_PATTERN`` regex does not match (``re.search``; the
  pattern brings its own anchors) or whose ``sku`` group is empty.
- **Order.** The version is the record's ``sequencer``. AWS: "the sequencers can be of different
  lengths. So to compare these values, you first left pad the shorter value with zeros and then do
  lexicographical comparison" (S3 event message structure) — which is what
  :func:`~schemas.events.normalize_version` does (upper-cased hex, left-padded to 40). Sequencers
  only order events of one key, and one key is one image id, which is all the ledger compares.
  A record without a sequencer (moto; some non-PUT/DELETE kinds) gets its event time in
  nanoseconds since the epoch, in decimal: the scale of the versions ``imgsync index`` gives.
- **Invalid records** (missing fields, a non-hex sequencer, a SKU the event contract refuses) are
  returned apart, for the caller to dead-letter; the other records of the message still count.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote_plus

from pydantic import ValidationError

from config.settings import Settings
from schemas.events import Action, ImageEvent
from schemas.s3 import (
    EventBridgeS3Event,
    MinioWebhookBody,
    S3EventRecord,
    S3TestEvent,
    SnsEnvelope,
)
from worker.cli.indexing import IMAGE_SUFFIXES

__all__ = [
    "Conversion",
    "InvalidNotification",
    "InvalidRecord",
    "KeyRules",
    "Skip",
    "action_for",
    "convert_document",
    "convert_record",
    "decode_key",
    "parse_notification",
    "version_for",
]

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Skip(StrEnum):
    """Why a well-formed record produced no event (a metrics-style fixed set)."""

    test_event = "test_event"
    other_event = "other_event"
    folder = "folder"
    ignored_prefix = "ignored_prefix"
    not_image = "not_image"
    no_sku = "no_sku"


class InvalidNotification(ValueError):
    """A message that is not an S3/MinIO notification at all (not JSON, wrong shape)."""


@dataclass(frozen=True)
class InvalidRecord:
    """A record of an otherwise valid notification that cannot become an event."""

    index: int
    record: Any
    error: str

    def body(self) -> str:
        """The record as JSON text (what a dead letter keeps)."""
        try:
            return json.dumps(self.record, ensure_ascii=False, default=repr)
        except (TypeError, ValueError):
            return repr(self.record)


@dataclass
class Conversion:
    """What one notification turned into."""

    events: list[ImageEvent] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    invalid: list[InvalidRecord] = field(default_factory=list)

    def merge(self, other: Conversion) -> None:
        self.events.extend(other.events)
        self.skipped.update(other.skipped)
        self.invalid.extend(other.invalid)


@dataclass(frozen=True)
class KeyRules:
    """Which keys are catalog images, and of which SKU."""

    pattern: re.Pattern[str]
    ignore_prefixes: tuple[str, ...] = ()
    suffixes: frozenset[str] = IMAGE_SUFFIXES

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRules:
        """``IMGSYNC_S3_KEY_PATTERN`` (validated by the settings) and ``IMGSYNC_S3_IGNORE_PREFIXES``."""
        return cls(re.compile(settings.s3_key_pattern), tuple(p for p in settings.s3_ignore_prefixes if p))

    def place(self, key: str) -> str | Skip:
        """The SKU of decoded ``key``, or why it is not a catalog image."""
        if key.endswith("/"):
            return Skip.folder
        if any(key.startswith(prefix) for prefix in self.ignore_prefixes):
            return Skip.ignored_prefix
        if PurePosixPath(key).suffix.lower() not in self.suffixes:
            return Skip.not_image
        match = self.pattern.search(key)
        sku = (match.group("sku") or "").strip() if match else ""
        return sku or Skip.no_sku


def decode_key(raw: str) -> str:
    """A notification's object key as stored in the bucket.

    Raises:
        ValueError: the percent-escapes do not decode as UTF-8.
    """
    try:
        return unquote_plus(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise ValueError(f"key {raw!r} does not decode as UTF-8: {exc}") from exc


#: ``versionId`` values that name no version (an unversioned or versioning-suspended bucket)
_NO_VERSION = frozenset({"", "null"})


#: MinIO's ``ObjectCreated:`` kinds that change an object's metadata, not its bytes
_METADATA_ONLY = ("PutTagging", "DeleteTagging", "PutRetention", "PutLegalHold")


def action_for(kind: str, version_id: str | None = None) -> Action | None:
    """The action of an event kind (``ObjectCreated:Put``; an ``s3:`` prefix is ignored), or None.
    A ``Delete`` of one version (``version_id`` given) is an upsert: the key's current version, if
    any is left, is what the index must hold. MinIO's tag, retention and legal-hold changes come
    as ``ObjectCreated:`` kinds but leave the bytes alone: None (a bucket-wide retention change
    would otherwise re-read every object)."""
    kind = kind.removeprefix("s3:")
    if kind.startswith("ObjectCreated:"):
        return None if kind.removeprefix("ObjectCreated:") in _METADATA_ONLY else Action.upsert
    if kind.startswith(("ObjectRemoved:", "LifecycleExpiration:")):
        one_version = (version_id or "") not in _NO_VERSION and not kind.endswith(":DeleteMarkerCreated")
        return Action.upsert if one_version else Action.delete
    return None


def version_for(record: S3EventRecord) -> str:
    """The record's sequencer, or its event time in nanoseconds (decimal) when it has none."""
    if record.s3.object_.sequencer:
        return record.s3.object_.sequencer
    return str(_nanoseconds(_aware(record.event_time)))


def convert_record(record: S3EventRecord, rules: KeyRules, source: str) -> ImageEvent | Skip:
    """One validated record → an event, or why it is skipped.

    Raises:
        ValueError: the key does not decode, or the event contract refuses a value (pydantic's
            ValidationError is a ValueError).
    """
    action = action_for(record.kind, record.s3.object_.version_id)
    if action is None:
        return Skip.other_event
    key = decode_key(record.s3.object_.key)
    placed = rules.place(key)
    if isinstance(placed, Skip):
        log.debug("skipped s3 key %r of bucket %r: %s", key, record.s3.bucket.name, placed)
        return placed
    return ImageEvent(
        uri=f"s3://{record.s3.bucket.name}/{key}",
        sku=placed,
        action=action,
        version=version_for(record),
        event_time=_aware(record.event_time),
        source=source,
    )


def convert_document(doc: Any, rules: KeyRules, source: str) -> Conversion:
    """A decoded notification (S3 body, SNS envelope, MinIO webhook body, S3 test event, EventBridge
    S3 event).

    Raises:
        InvalidNotification: the document is none of these.
    """
    if not isinstance(doc, dict):
        raise InvalidNotification(f"expected a JSON object, got {type(doc).__name__}")
    if "Records" in doc:
        try:
            body = MinioWebhookBody.model_validate(doc)
        except ValidationError as exc:
            raise InvalidNotification(f"'Records' is not a list: {_first_error(exc)}") from exc
        return _convert_records(body.records, rules, source)
    if doc.get("Type") == "Notification" and "Message" in doc:
        try:
            envelope = SnsEnvelope.model_validate(doc)
        except ValidationError as exc:
            raise InvalidNotification(f"SNS envelope: {_first_error(exc)}") from exc
        inner = _loads(envelope.message, "SNS Message")
        if isinstance(inner, dict) and inner.get("Type") == "Notification":
            raise InvalidNotification("an SNS envelope inside an SNS envelope")
        return convert_document(inner, rules, source)
    if doc.get("Event") == "s3:TestEvent":
        try:
            S3TestEvent.model_validate(doc)
        except ValidationError as exc:
            raise InvalidNotification(f"s3:TestEvent: {_first_error(exc)}") from exc
        return Conversion(skipped=Counter({Skip.test_event.value: 1}))
    if "detail-type" in doc or doc.get("source") == "aws.s3":
        if doc.get("source") != "aws.s3":
            raise InvalidNotification(
                f"EventBridge event from source {doc.get('source')!r}: only 'aws.s3' events are S3 notifications"
            )
        return _convert_records([doc], rules, source, _eventbridge_record)
    raise InvalidNotification(
        "not an S3 event notification: no 'Records', SNS 'Message', s3:TestEvent or EventBridge 'detail-type'"
        f" (keys: {sorted(doc)[:10]})"
    )


def parse_notification(body: str | bytes, rules: KeyRules, source: str) -> Conversion:
    """A raw message body → events, skips and invalid records.

    Raises:
        InvalidNotification: the body is not JSON or not a notification.
    """
    return convert_document(_loads(body, "body"), rules, source)


def _eventbridge_record(raw: Any) -> S3EventRecord:
    return EventBridgeS3Event.model_validate(raw).to_record()


def _convert_records(
    records: list[Any],
    rules: KeyRules,
    source: str,
    parse: Callable[[Any], S3EventRecord] = S3EventRecord.model_validate,
) -> Conversion:
    """Each raw record → parsed by ``parse`` → converted; bad ones set apart, the rest kept."""
    out = Conversion()
    for index, raw in enumerate(records):
        try:
            record = parse(raw)
            result = convert_record(record, rules, source)
        except ValidationError as exc:
            out.invalid.append(InvalidRecord(index, raw, _first_error(exc)))
            continue
        except ValueError as exc:
            out.invalid.append(InvalidRecord(index, raw, str(exc)))
            continue
        if isinstance(result, Skip):
            out.skipped[result.value] += 1
        else:
            out.events.append(result)
    return out


def _loads(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidNotification(f"{what} is not JSON: {exc}") from exc
    except RecursionError as exc:  # nested deeper than the parser goes: no notification is
        raise InvalidNotification(f"{what} is JSON nested too deeply to be a notification") from exc


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:3]]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _nanoseconds(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
