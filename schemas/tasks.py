"""Task payloads: what travels in a Celery message (JSON only, validated at both ends)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import ImageEvent

__all__ = [
    "PreprocessPayload", "PreprocessBatchPayload", "EncodePayload", "EncodeBatchPayload", "SkuRefreshPayload",
    "PREPROCESS_BATCH_MAX",
]  # fmt: skip

#: preprocess or encode payloads one message may carry at most
PREPROCESS_BATCH_MAX = 256


class PreprocessPayload(BaseModel):
    """Fetch, decode and normalize one image; hand its pixels to the encode stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: ImageEvent
    request_id: str = ""
    attempt: int = Field(0, ge=0)
    force: bool = False  # re-encode even when content, model and preprocessing are unchanged
    #: only these model versions (a background build); empty: every active version
    models: list[str] = Field(default_factory=list)


class PreprocessBatchPayload(BaseModel):
    """Several preprocess payloads in one message (a large submission): the worker runs each as if
    it had come alone. Items stay raw here, so that one malformed item is set aside on its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    items: list[dict[str, Any]] = Field(min_length=1, max_length=PREPROCESS_BATCH_MAX)


class EncodePayload(BaseModel):
    """Encode one preprocessed image whose pixels wait in the pixel store under ``pixel_key``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: ImageEvent
    request_id: str = ""
    content_hash: str
    pixel_key: str
    #: the model version whose preprocessing made the pixels and whose collections get the vector
    model_id: str = ""
    attempt: int = Field(0, ge=0)


class EncodeBatchPayload(BaseModel):
    """Several encode payloads in one message (the images of one preprocess batch): the encode
    worker takes each as if it had come alone. Items stay raw here, so that one malformed item is set
    aside on its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    items: list[dict[str, Any]] = Field(min_length=1, max_length=PREPROCESS_BATCH_MAX)


class SkuRefreshPayload(BaseModel):
    """Recompute the aggregate vectors of SKUs: ``sku`` (one) and/or ``skus`` (many, e.g. the SKUs an
    encode batch touched, refreshed together)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sku: str = ""
    skus: list[str] = Field(default_factory=list, max_length=10_000)
    attempt: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _some_sku(self) -> SkuRefreshPayload:
        if not self.sku and not any(self.skus):
            raise ValueError("names no SKU: give sku or skus")
        return self

    @property
    def all_skus(self) -> list[str]:
        """Every SKU named, sorted, once each."""
        return sorted({s for s in (self.sku, *self.skus) if s})
