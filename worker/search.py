"""Query the serving index with an image or a text."""

from __future__ import annotations

from pathlib import Path

from config.settings import Settings
from schemas.outputs import SearchHit
from worker.encoders import Encoder, create_encoder
from worker.errors import ConfigError, PermanentError
from worker.imaging.decode import decode_image
from worker.index import MilvusStore
from worker.ledger import Ledger, make_engine

__all__ = ["run_search", "serving_model_id"]


def serving_model_id(ledger: Ledger, store: MilvusStore) -> str | None:
    """The model id of the version the aliases point at (None before anything was indexed)."""
    coll = store.serving_collection()
    if coll is None:
        return None
    return ledger.model_for_collection(coll) or f"unknown ({coll})"


def run_search(
    settings: Settings,
    milvus_uri: str,
    *,
    image: Path | None,
    text: str | None,
    skus: bool,
    limit: int,
    encoder: Encoder | None = None,
) -> list[SearchHit]:
    """Nearest images (or SKUs) through the serving alias.

    Raises:
        ConfigError: unreadable query image, a model without text tower, or a configured model that is
            not the one serving (its vectors would not be comparable).
    """
    store = MilvusStore(milvus_uri, settings.milvus_token)
    ledger = Ledger(make_engine(settings.effective_database_url))
    try:
        serving = serving_model_id(ledger, store)
        if serving is None:
            return []
        encoder = encoder or create_encoder(settings.encoder)
        if encoder.model_id != serving:
            raise ConfigError(
                f"the index serves model {serving}, but IMGSYNC_MODEL={settings.model} is {encoder.model_id}: "
                "set IMGSYNC_MODEL to the serving model"
            )
        if image is not None:
            try:
                data = image.read_bytes()
            except OSError as exc:
                raise ConfigError(f"--image {image}: {exc.strerror or exc}") from exc
            try:
                pic = decode_image(data, settings.imaging)
            except PermanentError as exc:
                raise ConfigError(f"--image {image}: {exc.reason}: {exc}") from exc
            vector = encoder.encode(encoder.preprocess([pic]))[0]
        else:
            vector = encoder.encode_text([text or ""])[0]
        raw = store.search(vector, limit=limit, skus=skus)
    finally:
        store.close()
        ledger.engine.dispose()
    return [SearchHit(uri=h.get("uri"), image_id=h.get("image_id"), sku=h["sku"], score=h["score"]) for h in raw]
