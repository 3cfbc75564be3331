"""``imgsync verify``: compare the ledger (source of truth) with the serving Milvus collections (or,
with ``--model``, a standby or building version's), and enqueue exactly the fixes with ``--repair``.

Kinds of drift: ``missing`` (ledger says indexed, no vector), ``orphans`` (a vector the ledger does not
hold as indexed), ``stale`` (the vector's content hash, model, SKU or uri differs from the ledger's),
and ``sku_mismatch`` (a SKU vector that is not the normalized mean of its current images, has the
wrong image count, or exists without images / is absent with images). A collection (or serving
alias) that Milvus lost is read as empty and named in ``collections_missing``; repair makes it again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa

from schemas.tasks import PreprocessPayload
from worker.dispatch import Dispatcher
from worker.encoders.base import l2_normalize
from worker.index import IMAGES_ALIAS, SKUS_ALIAS, CollectionMissing, MilvusStore
from worker.index.milvus_store import SKU_MAX, URI_MAX
from worker.ledger import ImageState, Ledger, VersionRow, VersionStatus
from worker.ledger.tables import image_vectors, images

__all__ = ["VerifyReport", "verify", "verify_version", "repair", "SKU_TOLERANCE"]

log = logging.getLogger(__name__)

#: largest per-component difference between a stored SKU vector and the recomputed mean
SKU_TOLERANCE = 1e-4
_PAGE = 1000


@dataclass
class VerifyReport:
    missing: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    sku_mismatch: list[str] = field(default_factory=list)
    model_id: str | None = None
    #: a version that does not serve: its collections, and how many indexed images it holds no
    #: current vector of (not a problem: a cutover or rollback to it re-queues them)
    version: VersionRow | None = None
    uncovered: int | None = None
    #: collections or serving aliases of the checked version that Milvus does not have (read as empty)
    collections_missing: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.orphans) + len(self.stale) + len(self.sku_mismatch)


def verify(ledger: Ledger, store: MilvusStore) -> VerifyReport:
    """Compare every ledger row with the serving collections (fetching vectors by primary key)."""
    report = VerifyReport()
    collection = store.serving_collection()
    if collection is None:  # nothing indexed yet (or the alias was lost): every "indexed" row is missing
        with ledger.engine.connect() as conn:
            report.missing = sorted(
                conn.execute(sa.select(images.c.image_id).where(images.c.state == ImageState.indexed)).scalars()
            )
        if report.missing:
            report.collections_missing = [IMAGES_ALIAS]
            serving = ledger.serving_version()
            report.model_id = serving.model_id if serving is not None else None
        return report
    model_id = ledger.model_for_collection(collection)
    report.model_id = model_id
    in_milvus = _held(store, IMAGES_ALIAS, report)
    members: dict[str, list[str]] = defaultdict(list)
    indexed: set[str] = set()
    in_flight: set[str] = set()  # first-time images whose vector may already be written
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(images.c.image_id, images.c.uri, images.c.sku, images.c.state, images.c.content_hash, images.c.model_id)
        )
        for r in rows:
            if r.state == ImageState.pending:
                in_flight.add(r.image_id)
            if r.state != ImageState.indexed:
                continue
            indexed.add(r.image_id)
            members[r.sku].append(r.image_id)
            held = in_milvus.get(r.image_id)
            if held is None:
                report.missing.append(r.image_id)
            elif held != _Held(r.content_hash, r.model_id, r.sku[:SKU_MAX], r.uri[:URI_MAX]) or (model_id and r.model_id != model_id):
                report.stale.append(r.image_id)
    _conclude(report, ledger, store, in_milvus, members, known=indexed | in_flight)
    return report


def verify_version(ledger: Ledger, store: MilvusStore, version: VersionRow) -> VerifyReport:
    """Compare a version that does not serve (standby, building) with what the ledger records of it.

    Such a version holds the vectors its records (``image_vectors``) name, possibly of content older
    than the image's current one (then the image is *uncovered*: a cutover or rollback re-queues it).
    ``missing``: a record whose vector is absent; ``stale``: a vector whose content or model is not
    its record's; ``orphans``: a vector of an image the ledger holds as neither indexed nor waiting
    (a rollback would serve it); ``sku_mismatch``: as for the serving version, over the images the
    version records.
    """
    report = VerifyReport(model_id=version.model_id, version=version)
    in_milvus = _held(store, version.images_collection, report)
    uncovered = 0
    members: dict[str, list[str]] = defaultdict(list)
    known: set[str] = set()  # indexed or waiting: a vector of theirs is no orphan
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(images.c.image_id, images.c.uri, images.c.sku, images.c.state, images.c.content_hash,
                      image_vectors.c.content_hash.label("held_hash"), image_vectors.c.sku.label("held_sku"))
            .select_from(images.outerjoin(image_vectors, sa.and_(image_vectors.c.image_id == images.c.image_id,
                                                                  image_vectors.c.model_id == version.model_id)))
        )  # fmt: skip
        for r in rows:
            if r.state in (ImageState.pending, ImageState.indexed):
                known.add(r.image_id)
            if r.state != ImageState.indexed:
                continue
            if (r.held_hash, r.held_sku) != (r.content_hash, r.sku):  # no record, or one of older content
                uncovered += 1
            if r.held_hash is None:
                continue
            if r.held_sku == r.sku:
                members[r.sku].append(r.image_id)
            held = in_milvus.get(r.image_id)
            if held is None:
                report.missing.append(r.image_id)
            elif held != _Held(r.held_hash, version.model_id, r.held_sku[:SKU_MAX], r.uri[:URI_MAX]):
                report.stale.append(r.image_id)
    report.uncovered = uncovered
    collections = (version.images_collection, version.skus_collection)
    _conclude(report, ledger, store, in_milvus, members, known=known, collections=collections)
    return report


class _Held(NamedTuple):
    """What a vector's row says of its image."""

    content_hash: str | None
    model_id: str | None
    sku: str | None
    uri: str | None


def _held(store: MilvusStore, collection: str, report: VerifyReport) -> dict[str, _Held]:
    """``image_id -> _Held`` of every vector in ``collection`` (none when Milvus lost it: noted in
    ``report.collections_missing``)."""
    fields = ["image_id", *_Held._fields]
    try:
        return {r["image_id"]: _Held(*(r.get(f) for f in _Held._fields)) for r in store.rows(collection, fields, _PAGE)}
    except CollectionMissing:
        report.collections_missing.append(collection)
        return {}


def _conclude(
    report: VerifyReport,
    ledger: Ledger,
    store: MilvusStore,
    in_milvus: dict[str, _Held],
    members: dict[str, list[str]],
    *,
    known: set[str],
    collections: tuple[str, str] = (IMAGES_ALIAS, SKUS_ALIAS),
) -> None:
    """The findings every check ends with: orphans (vectors of images not ``known``), sorted lists,
    and the SKU vectors that are not their members' mean (but for those a refresh is on its way for)."""
    report.orphans = sorted(set(in_milvus) - known)
    report.missing.sort()
    report.stale.sort()
    awaiting = set(ledger.dirty_skus())
    bad = _check_skus(store, members, set(in_milvus), report, images_in=collections[0], skus_in=collections[1])
    report.sku_mismatch = [s for s in bad if s not in awaiting]


def _check_skus(
    store: MilvusStore,
    members: dict[str, list[str]],
    present: set[str],
    report: VerifyReport,
    *,
    images_in: str = IMAGES_ALIAS,
    skus_in: str = SKUS_ALIAS,
) -> list[str]:
    try:
        stored = {r["sku"]: r for r in store.rows(skus_in, ["sku", "vector", "image_count"], _PAGE)}
    except CollectionMissing:
        report.collections_missing.append(skus_in)
        stored = {}
    bad = set(stored) - set(members)  # SKU vectors whose SKU has no images left
    for sku, ids in members.items():
        row = stored.get(sku)
        have = [i for i in ids if i in present]
        if row is None:
            bad.add(sku)
            continue
        vectors = store.image_vectors(images_in, have) if have else {}
        if not vectors or int(row["image_count"]) != len(vectors):
            bad.add(sku)
            continue
        mean = l2_normalize(np.mean(np.stack([vectors[i] for i in sorted(vectors)]), axis=0))
        if float(np.max(np.abs(mean - np.asarray(row["vector"], dtype=np.float32)))) > SKU_TOLERANCE:
            bad.add(sku)
    return sorted(bad)


def repair(report: VerifyReport, ledger: Ledger, store: MilvusStore, dispatch: Dispatcher) -> dict[str, int]:
    """Enqueue exactly the fixes: re-encode missing and stale images, delete orphan vectors, refresh
    mismatched SKUs. Returns how many of each were sent."""
    checked = report.version or ledger.serving_version()
    if report.collections_missing and checked is not None:  # made again (serving: with its aliases) before anything is sent
        store.forget_collections()
        store.ensure_version(checked.model_id, checked.dim, serve_if_unset=checked.status == VersionStatus.serving)
    redo = report.missing + report.stale
    rows = ledger.rows(redo)
    events = [r.event("repair") for r in rows.values()]
    only = [checked.model_id] if checked is not None else []  # the version checked alone, not every active one
    dispatch.preprocess_many([PreprocessPayload(event=ev, force=True, models=only) for ev in events])
    if report.orphans:
        collection = report.version.images_collection if report.version is not None else store.serving_collection()
        if collection:
            store.delete_images(collection, report.orphans)
    if report.sku_mismatch:
        ledger.mark_dirty(report.sku_mismatch)
        dispatch.refresh_skus(sorted(report.sku_mismatch), countdown=None)
    return {"reencode": len(events), "orphans_deleted": len(report.orphans), "skus_refreshed": len(report.sku_mismatch)}
