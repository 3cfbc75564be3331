"""The one event contract every source produces: :class:`ImageEvent`."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

__all__ = [
    "Action",
    "CropBox",
    "ImageEvent",
    "escape_bytes",
    "invalid_reasons",
    "image_id_for",
    "normalize_sku",
    "normalize_uri",
    "normalize_version",
    "path_from_uri",
    "URI_NORMALIZED",
    "VERSION_WIDTH",
]

#: Width versions are left-padded to, so that string order is numeric order.
VERSION_WIDTH = 40

_SCHEMES = ("file", "s3", "http", "https")
#: how a normalized uri starts (:func:`normalize_uri`'s output)
_NORMAL_PREFIXES = ("file:///", "s3://", "http://", "https://")
#: validation context key: the uris were normalized where the message was made (a task payload
#: between stages). A uri in normal form is then taken as it is, without parsing it again.
URI_NORMALIZED = "uri_normalized"


class Action(StrEnum):
    upsert = "upsert"
    delete = "delete"


class CropBox(BaseModel):
    """A crop given by the catalog, in normalized coordinates of the (EXIF-rotated) image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    x: float = Field(ge=0.0, le=1.0)
    y: float = Field(ge=0.0, le=1.0)
    w: float = Field(gt=0.0, le=1.0)
    h: float = Field(gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _inside(self) -> CropBox:
        if self.x + self.w > 1.0 + 1e-9 or self.y + self.h > 1.0 + 1e-9:
            raise ValueError(f"crop box {self.x},{self.y},{self.w},{self.h} reaches outside the image")
        return self


def normalize_uri(value: str) -> str:
    """Canonical form of an image location: ``file:///abs/path``, ``s3://b/k`` or ``http(s)://…``.

    A local path is made absolute and normalized lexically (``.``, ``..``, repeated ``/``), not
    resolved: a symbolic link is an image of its own, named by where it lies (in a catalog laid out
    ``<sku>/<image>``, a link in another SKU's folder is that SKU's image). Reading the file follows
    the link, and IMGSYNC_FILE_ROOTS is checked on the file it reaches.

    Raises:
        ValueError: an unknown scheme, a ``file://`` uri naming another host, a NUL character, or an
            empty location.
    """
    value = value.strip()
    if not value:
        raise ValueError("empty image uri")
    if "\x00" in value:  # no file or key name can hold it, and PostgreSQL's text refuses it
        raise ValueError(f"uri {value!r} contains a NUL character")
    parsed = urlparse(value)
    if parsed.scheme in _SCHEMES:
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise ValueError(f"uri {value!r} names host {parsed.netloc!r}: a file:// uri must name a local file")
            path = unquote(parsed.path, errors="surrogateescape")
            if "\x00" in path:
                raise ValueError(f"uri {value!r} contains a NUL character (%00)")
            return _local_uri(path)
        if not parsed.netloc:
            raise ValueError(f"uri {value!r} has no host or bucket")
        _utf8("uri", value)  # a file path keeps any bytes (percent-encoded); a key or URL is text
        return value
    if parsed.scheme and len(parsed.scheme) > 1:  # a Windows drive letter is not a scheme
        raise ValueError(
            f"uri {value!r} has scheme {parsed.scheme!r}, which is not supported; expected one of {', '.join(_SCHEMES)}"
        )
    return _local_uri(os.path.expanduser(value))


def escape_bytes(text: str) -> str:
    """``text`` with the bytes that were not UTF-8 (read by Python as surrogates: a file name in
    another encoding, a SQLite text, a JSON ``\\udcff`` escape) shown as ``\\xNN``: printable,
    and storable where only UTF-8 is (databases, brokers, JSON documents, Milvus)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def invalid_reasons(exc: ValidationError) -> str:
    """What an event's validation found, in a line (pydantic's ``Value error,`` prefixes left out)."""
    return "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())


def _utf8(what: str, value: str) -> None:
    """Refuses text that is not UTF-8 (see :func:`escape_bytes`)."""
    shown = escape_bytes(value)
    if shown != value:
        raise ValueError(f"{what} '{shown}' is not valid UTF-8")


def _local_uri(path: str) -> str:
    """``file://`` uri of a local path: absolute, normalized lexically, links not followed."""
    path = os.path.normpath(os.path.abspath(path))
    if path.startswith("//"):  # POSIX keeps a leading "//" apart; a catalog path never means it
        path = "/" + path.lstrip("/")
    return Path(path).as_uri()


def _looks_normal(uri: str) -> bool:
    """Whether ``uri`` has the form :func:`normalize_uri` gives (without resolving anything)."""
    if not uri.startswith(_NORMAL_PREFIXES) or uri != uri.strip():
        return False
    if not uri.startswith("file:"):
        return True
    path = uri[7:]
    return "//" not in path and "/./" not in path and "/../" not in path and not path.endswith(("/.", "/.."))


def path_from_uri(uri: str) -> Path:
    """The local path of a ``file://`` uri."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"{uri!r} is not a file:// uri")
    return Path(unquote(parsed.path, errors="surrogateescape"))


def image_id_for(uri: str) -> str:
    """The stable primary key of an image: a hash of its normalized uri."""
    return hashlib.blake2b(uri.encode("utf-8"), digest_size=16).hexdigest()


def normalize_sku(value: str) -> str:
    """A SKU as it is stored: trimmed, non-empty, without control characters.

    Raises:
        ValueError: empty or with control characters.
    """
    sku = value.strip()
    if not sku or any(ord(c) < 32 for c in sku):
        raise ValueError(f"sku {sku!r} is empty or has control characters")
    return sku


def normalize_version(value: str | int) -> str:
    """A version (S3 sequencer hex, catalog timestamp in µs, event id) as a sortable string."""
    text = str(value).strip().upper()
    if not text or not all(c in "0123456789ABCDEF" for c in text):
        raise ValueError(f"version {value!r} must be a decimal or hexadecimal number")
    if len(text) > VERSION_WIDTH:
        raise ValueError(f"version {value!r} is longer than {VERSION_WIDTH} digits")
    return text.rjust(VERSION_WIDTH, "0")


class ImageEvent(BaseModel):
    """One change to one catalog image, whatever its source."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    sku: str = Field(min_length=1, max_length=256)
    action: Action = Action.upsert
    version: str = Field(default_factory=lambda: normalize_version(time.time_ns()))
    crop: CropBox | None = None
    event_time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: str = Field("cli", max_length=32)

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str, info: ValidationInfo) -> str:
        if info.context and info.context.get(URI_NORMALIZED) and _looks_normal(value):
            return value
        return normalize_uri(value)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> str:
        return normalize_version(value)  # type: ignore[arg-type]

    @field_validator("sku", mode="before")
    @classmethod
    def _sku_text(cls, value: object) -> object:
        if isinstance(value, str):
            _utf8("sku", value)
        return value

    @field_validator("sku")
    @classmethod
    def _sku(cls, value: str) -> str:
        return normalize_sku(value)

    @property
    def image_id(self) -> str:
        return image_id_for(self.uri)
