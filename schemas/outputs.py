"""JSON documents printed by the CLI's ``--json`` mode (the public contract: README.md, "JSON outputs")."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

__all__ = ["ErrorInfo", "ErrorOutput", "VerifyOutput", "WorkerInfo", "FailureItem", "FailuresOutput", "IndexResult", "IndexOutput", "SearchHit", "SearchOutput", "StatusOutput"]


def _utc(value: datetime) -> datetime:
    """Times are stored in UTC; SQLite gives them back without a zone: say which it is."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


#: a point in time, always with its zone (ISO 8601 with ``+00:00`` for the ledger's UTC times)
Instant = Annotated[datetime, AfterValidator(_utc)]


class IndexResult(BaseModel):
    uri: str
    image_id: str
    sku: str
    #: ``deleted``: only for the deletes of ``index --prune`` (images whose files are gone)
    outcome: Literal["indexed", "unchanged", "failed", "pending", "deleted"]
    reason: str | None = None


class IndexOutput(BaseModel):
    """``index --json``: with ``--wait`` one result per image; without it, the images already answered
    (unchanged) while the rest (``queued``) goes to the workers."""

    results: list[IndexResult]
    request_id: str | None = None
    #: images handed to the workers (not answered at once as unchanged)
    queued: int | None = None


class SearchHit(BaseModel):
    uri: str | None = None
    image_id: str | None = None
    sku: str
    score: float = Field(description="cosine similarity")


class SearchOutput(BaseModel):
    hits: list[SearchHit]


class WorkerInfo(BaseModel):
    name: str
    host: str
    pid: int
    queues: str
    model: str
    started_at: Instant
    last_seen: Instant


class VersionInfo(BaseModel):
    """A model version of the index and how much of the catalog it holds."""

    model_id: str
    spec: str | None
    status: str = Field(description="serving | standby | building | retired")
    dim: int
    covered: int = Field(description="indexed images this version holds a current vector for")
    total: int = Field(description="indexed images")
    images_collection: str
    skus_collection: str


class StatusOutput(BaseModel):
    ready: bool
    milvus_uri: str
    model_id: str | None = Field(description="model serving search (alias target), if any")
    configured_model: str
    broker_url: str
    database_url: str
    queues: dict[str, int | None]
    ledger: dict[str, int]
    skus: int
    dirty_skus: int
    failures_by_reason: dict[str, int] = Field(default_factory=dict)
    dead_letters: int = Field(0, description="malformed messages set aside (not retried)")
    waiting_oldest_seconds: float | None = Field(
        None, description="seconds since the oldest image still waiting to be processed was last touched"
    )
    stalled: int = Field(
        0,
        description="images waiting longer than IMGSYNC_REDRIVE_AFTER_SECONDS (sent again once the queues are empty)",
    )
    workers: list[WorkerInfo] = Field(default_factory=list, description="worker nodes seen in the last minute")
    indexed_last_5m: int = 0
    indexed_per_second_5m: float = 0.0
    aliases: dict[str, str] = Field(default_factory=dict, description="serving alias -> collection")
    versions: list[VersionInfo] = Field(default_factory=list, description="active model versions, serving first")
    errors: list[str] = Field(default_factory=list)


class FailureItem(BaseModel):
    image_id: str
    uri: str
    sku: str
    reason: str | None
    detail: str | None
    attempts: int
    updated_at: Instant | None
    state: str  #: the image's ledger state (``failed`` in ``failures list``; ``failures show`` may name any image)


class FailuresOutput(BaseModel):
    failures: list[FailureItem]
    by_reason: dict[str, int]


class DeadLetterItem(BaseModel):
    """A message set aside because it can never be processed (``imgsync failures dead-letters``)."""

    id: int
    task: str  #: the pipeline task or the source that refused it (``sources.sqs``, ``sources.webhook``, …)
    reason: str
    error: str
    body: str  #: the message as received (cut at 10,000 characters)
    created_at: Instant


class DeadLettersOutput(BaseModel):
    dead_letters: list[DeadLetterItem]
    by_task: dict[str, int]


class VerifyOutput(BaseModel):
    problems: int
    missing: list[str]
    orphans: list[str]
    stale: list[str]
    sku_mismatch: list[str]
    model_id: str | None = None
    repaired: dict[str, int] | None = None
    #: with ``--model`` of a version that does not serve: its status, and how many indexed images it
    #: holds no current vector of (a cutover or rollback re-queues them; not counted as problems)
    status: str | None = None
    uncovered: int | None = None
    #: collections or serving aliases of the checked version Milvus lost (read as empty: what they
    #: held is ``missing``); ``--repair`` makes them again
    collections_missing: list[str] = []


class ErrorInfo(BaseModel):
    #: ``usage`` (exit status 2: a setting, an argument or the schema) or ``unreachable`` (exit status 3)
    kind: Literal["usage", "unreachable"]
    exit_status: int
    message: str
    #: for ``unreachable``: the service (broker, database, Milvus…) and the setting that names its address
    service: str | None = None
    setting: str | None = None


class ErrorOutput(BaseModel):
    """Any ``--json`` command that stops on an error before its own document: the error, on stdout, so a
    script reading stdout always gets one JSON document (the same line goes to stderr too)."""

    error: ErrorInfo
