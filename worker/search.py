"""Query the serving index with an image or a text."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from config.settings import Settings
from schemas.outputs import SearchHit
from worker.encoders import Encoder, create_encoder
from worker.errors import ConfigError, PermanentError, ServiceUnavailable
from worker.imaging.decode import decode_and_crop
from worker.index import IMAGES_ALIAS, MilvusStore
from worker.index.milvus_store import store_for, version_names
from worker.ledger import Ledger, make_engine

__all__ = ["run_search", "serving_model_id", "query_encoder"]


def serving_model_id(ledger: Ledger, store: MilvusStore) -> str | None:
    """The model id of the version the aliases point at (None before anything was indexed)."""
    coll = store.serving_collection()
    if coll is None:
        return None
    return ledger.model_for_collection(coll) or f"unknown ({coll})"


def query_encoder(settings: Settings, ledger: Ledger, model_id: str, encoder: Encoder | None = None) -> Encoder:
    """The model of the serving version, loaded by the spec the ledger keeps for it.

    Raises:
        ConfigError: no spec is known for the version and the configured model is another one.
    """
    if encoder is not None and encoder.model_id == model_id:
        return encoder
    row = ledger.version(model_id)
    spec = row.spec if row is not None and row.spec else settings.model
    enc = create_encoder(replace(settings.encoder, spec=spec))
    if enc.model_id != model_id:
        raise ConfigError(
            f"the index serves model {model_id}, but its spec {spec!r} now loads {enc.model_id}: "
            "restore that model's weights, or cut over to another version"
        )
    return enc


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
    """Nearest images (or SKUs) in the serving version, encoded with that version's model.

    The collection is resolved from the alias once and searched by name, so that a cutover in between
    never pairs one model's query vector with another model's collection.

    Raises:
        ConfigError: unreadable query image, a model without text tower, or a serving model that can
            no longer be loaded.
    """
    data = b""
    if image is not None:  # an unreadable query is an error whether or not anything is indexed yet
        data = _query_bytes(image, settings)
    store = store_for(settings, milvus_uri)
    ledger = Ledger(make_engine(settings.effective_database_url))
    try:
        coll = store.serving_collection()
        if coll is None:  # nothing indexed yet: no hits, but a text query the model cannot take is still an error
            if (indexed := ledger.counts().get("indexed", 0)) > 0:  # Milvus lost the serving aliases: not "no hits"
                raise ServiceUnavailable(
                    "Milvus", "IMGSYNC_MILVUS_URI", milvus_uri,
                    f"it has no serving collection ({IMAGES_ALIAS}) while the ledger holds {indexed} indexed image(s): "
                    "`imgsync verify --repair` makes it again",
                    state="failing",
                )  # fmt: skip
            if text is not None and (encoder or create_encoder(settings.encoder)).has_text_tower() is False:
                raise ConfigError(f"model {settings.model} has no text tower: search by image instead")
            if image is not None:  # a file that is no picture is an error too, as it is once images are indexed
                try:
                    decode_and_crop(data, settings.imaging, None)
                except PermanentError as exc:
                    raise ConfigError(f"--image {image}: {exc.reason}: {exc}") from exc
            return []
        model_id = ledger.model_for_collection(coll)
        if model_id is None:
            raise ConfigError(f"the serving alias points at {coll}, which the state database does not know")
        encoder = query_encoder(settings, ledger, model_id, encoder)
        if image is not None:
            try:
                # as the image was indexed: the same reduced-scale decode and border trim
                from worker.pipeline import decode_min_side

                pic = decode_and_crop(data, settings.imaging, None, min_side=decode_min_side(encoder, None))
            except PermanentError as exc:
                raise ConfigError(f"--image {image}: {exc.reason}: {exc}") from exc
            vector = encoder.encode(encoder.preprocess([pic]))[0]
        else:
            vector = encoder.encode_text([text or ""])[0]
        target = coll
        if skus:
            version = ledger.version(model_id)
            target = version.skus_collection if version is not None else version_names(model_id).skus
        raw = store.search(vector, limit=limit, skus=skus, collection=target)
    finally:
        store.close()
        ledger.engine.dispose()
    # cosine similarity of unit vectors, computed in float32: an image against itself can come out
    # as 1.0000001; the contract's score is a cosine, so it is kept within [-1, 1]
    return [
        SearchHit(uri=h.get("uri"), image_id=h.get("image_id"), sku=h["sku"], score=min(1.0, max(-1.0, float(h["score"]))))
        for h in raw
    ]


def _query_bytes(image: Path, settings: Settings) -> bytes:
    """The query file's bytes, at most IMGSYNC_MAX_IMAGE_BYTES (the limit indexing applies: a huge
    file, or /dev/zero, is refused instead of read into memory)."""
    limit = settings.max_image_bytes
    try:
        with image.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"--image {image}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise ConfigError(f"--image {image}: over IMGSYNC_MAX_IMAGE_BYTES={limit} bytes")
    return data
