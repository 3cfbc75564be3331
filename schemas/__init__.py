"""Pydantic contracts: events, task payloads, reason codes, CLI JSON outputs."""

from schemas.events import Action, CropBox, ImageEvent, image_id_for, normalize_uri, normalize_version
from schemas.outputs import IndexOutput, IndexResult, SearchHit, SearchOutput, StatusOutput
from schemas.reasons import PERMANENT_REASONS, Reason
from schemas.tasks import EncodePayload, PreprocessPayload, SkuRefreshPayload

__all__ = [
    "Action",
    "CropBox",
    "EncodePayload",
    "ImageEvent",
    "IndexOutput",
    "IndexResult",
    "PERMANENT_REASONS",
    "PreprocessPayload",
    "Reason",
    "SearchHit",
    "SearchOutput",
    "SkuRefreshPayload",
    "StatusOutput",
    "image_id_for",
    "normalize_uri",
    "normalize_version",
]
