"""The ledger: per-image state and ordering, per-SKU dirty marks. The source of truth for membership.

Every write is conditional on the event version it belongs to, so that duplicates and replays
converge and a stale event never overwrites a newer one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from schemas.events import Action, CropBox, ImageEvent
from schemas.reasons import Reason
from worker.ledger.db import reader
from worker.ledger.housekeeping import HousekeepingMixin
from worker.ledger.tables import ImageState, VersionStatus, image_vectors, images, index_versions, skus

__all__ = ["Ledger", "Acceptance", "Accepted", "ImageRow", "IndexClaim", "IndexedImage", "KnownImage", "VersionRow", "Coverage"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ImageRow:
    image_id: str
    uri: str
    sku: str
    state: str
    reason: str | None
    detail: str | None
    content_hash: str | None
    model_id: str | None
    version: str
    request_id: str | None
    outcome: str | None
    attempts: int
    updated_at: datetime | None = None
    crop: str | None = None  # CropBox JSON
    action: str | None = None  # of the newest accepted event (None: upsert)

    def event(self, source: str = "reindex", *, keep_version: bool = True) -> ImageEvent:
        """The image's newest accepted event again, as the ledger knows it (crop box included): an
        upsert that re-indexes it, or a delete when the newest event was one (never an upsert that
        would bring a deleted image back).

        It keeps the image's version: a re-run is not a newer change, and a fresh clock value would
        outrank the source's own versions (S3 sequencers) and make its later events look stale."""
        extra = {"version": self.version} if keep_version else {}
        crop = CropBox.model_validate_json(self.crop) if self.crop else None
        action = Action.delete if self.action == Action.delete else Action.upsert
        return ImageEvent(uri=self.uri, sku=self.sku, crop=crop, source=source, action=action, **extra)


@dataclass(frozen=True)
class Acceptance:
    """What the ledger made of an event: ``current`` (go on) or ``stale`` (a newer one was seen)."""

    current: bool
    previous: ImageRow | None
    #: the SKU the image just left (marked dirty; its refresh must be scheduled)
    left_sku: str | None = None


@dataclass(frozen=True)
class Accepted:
    """What the ledger made of many events: those still current, and the SKUs images left (marked
    dirty; their refresh must be scheduled)."""

    current: list[ImageEvent]
    left_skus: list[str]


@dataclass(frozen=True)
class KnownImage:
    """An image as the ledger has it, read ahead for a batch (:meth:`Ledger.known_images`): its row
    (None: not recorded) and ``model_id -> (content_hash, sku)`` of the vectors held for it."""

    row: ImageRow | None
    held: dict[str, tuple[str, str]]


@dataclass(frozen=True)
class IndexedImage:
    """An image whose vector Milvus accepted."""

    image_id: str
    version: str
    content_hash: str
    model_id: str
    request_id: str


class IndexClaim:
    """A transaction holding images' ledger rows while their vectors are written (:meth:`Ledger.claim`).
    ``current``: ``image_id -> (version, sku)`` of the claimed images neither deleted nor failed (a
    failed image owes no vector, even one of its own version encoded by another copy of its event)."""

    def __init__(self, conn: Connection, current: dict[str, tuple[str, str]]) -> None:
        self.conn = conn
        self.current = current

    def holds(self, image_id: str, version: str) -> bool:
        """Whether ``version`` is still ``image_id``'s newest event (not a delete, not failed)."""
        row = self.current.get(image_id)
        return row is not None and row[0] == version

    def release(self) -> None:
        """Close the transaction (rolled back unless committed). Idempotent."""
        self.conn.close()


@dataclass(frozen=True)
class VersionRow:
    """A model version: its collections, how to load its model, and its status."""

    model_id: str
    spec: str | None
    status: str
    images_collection: str
    skus_collection: str
    dim: int
    created_at: datetime
    activated_at: datetime | None


@dataclass(frozen=True)
class Coverage:
    """How much of the indexed catalog a model version holds current vectors for."""

    model_id: str
    covered: int
    total: int

    @property
    def complete(self) -> bool:
        return self.covered >= self.total

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else self.covered / self.total


def _row(r: sa.Row | None) -> ImageRow | None:
    if r is None:
        return None
    m = r._mapping
    return ImageRow(**{f: m[f] for f in ImageRow.__dataclass_fields__ if f in m})


def _owes_no_vector(row: ImageRow | None) -> bool:
    """Gone, failed, or with a delete on its way: no version should hold a vector of it."""
    return row is None or row.state in (ImageState.deleted, ImageState.failed) or row.action == Action.delete


class Ledger(HousekeepingMixin):
    """SQL operations on the ledger tables; every method is one short transaction, except a
    :meth:`claim`, which stays open while its batch's vectors are upserted into Milvus."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reader = reader(engine)  # read-only transactions: no SQLite write lock
        #: rows are locked one by one (PostgreSQL); SQLite's BEGIN IMMEDIATE locks the whole file
        self.locks_rows = engine.dialect.name != "sqlite"

    # --- events --------------------------------------------------------------------------------

    def accept(self, event: ImageEvent, request_id: str = "", known: ImageRow | None = None) -> Acceptance:
        """Record ``event`` if it is not older than what the ledger has seen for its image.

        A stale event changes nothing but the request's outcome (``unchanged``). A newer upsert
        makes the image ``pending`` unless it is already indexed (it stays searchable meanwhile);
        a SKU change marks the old SKU dirty at once. The worker's accept of an event its publisher
        recorded (``accept_many``) and nobody processed yet is a read: nothing to write. ``known``:
        the image's row as just read (:meth:`known_images`); when it records this event, no read at all.
        """
        if known is not None and _records(known, event, request_id):
            return Acceptance(current=True, previous=known)
        with self._reader.connect() as conn:
            seen = self._get(conn, event.image_id, lock=False)
        if seen is not None and _records(seen, event, request_id):
            # its publisher recorded it already (pipeline.submit): nothing to write, no write lock taken
            return Acceptance(current=True, previous=seen)
        now = _now()
        with self.engine.begin() as conn:
            prev = self._get(conn, event.image_id, lock=True)
            got = self._accept(conn, event, request_id, prev, now, None)
            if got.left_sku is not None:
                self._mark_dirty(conn, [got.left_sku], now)
            return got

    def accept_many(self, events: Sequence[ImageEvent], request_id: str = "") -> Accepted:
        """:meth:`accept` for many events in one transaction, as a publisher records them before it
        publishes: an image whose message a broker then loses is waiting in the ledger, where the
        redrive (``worker.redrive``) finds it. Returns the current events and the SKUs images left.
        """
        for attempt in range(3):
            try:
                return self._accept_many(events, request_id)
            except sa.exc.IntegrityError:  # another writer inserted one of these images meanwhile
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _accept_many(self, events: Sequence[ImageEvent], request_id: str) -> Accepted:
        now = _now()
        current: list[ImageEvent] = []
        left: set[str] = set()
        with self.engine.begin() as conn:
            todo = list(events)
            while todo:  # an image twice in one call: its later events go in the next round
                seen: set[str] = set()
                now_round: list[ImageEvent] = []
                later: list[ImageEvent] = []
                for ev in todo:
                    (later if ev.image_id in seen else now_round).append(ev)
                    seen.add(ev.image_id)
                prevs = self._get_many(conn, sorted(seen), lock=True)  # sorted: a stable lock order
                inserts: list[dict] = []
                for ev in now_round:
                    got = self._accept(conn, ev, request_id, prevs.get(ev.image_id), now, inserts)
                    if got.current:
                        current.append(ev)
                    if got.left_sku is not None:
                        left.add(got.left_sku)
                if inserts:
                    conn.execute(images.insert(), inserts)
                todo = later
            self._mark_dirty(conn, left, now)  # once, sorted: SKU locks in the order every writer takes them
        return Accepted(current, sorted(left))

    def _accept(
        self,
        conn: Connection,
        event: ImageEvent,
        request_id: str,
        prev: ImageRow | None,
        now: datetime,
        inserts: list[dict] | None,
    ) -> Acceptance:
        """One event against its row ``prev`` (read under lock); new rows go to ``inserts`` when
        given (one statement for many), else are inserted here. The SKU the image left is the caller's
        to mark dirty (after all of its image rows, as every writer locks them)."""
        if prev is not None and prev.version > event.version:
            if request_id:
                conn.execute(
                    images.update()
                    .where(images.c.image_id == event.image_id)
                    .values(request_id=request_id, outcome="unchanged", updated_at=now)
                )
            return Acceptance(current=False, previous=prev)
        values = {
            "uri": event.uri,
            "sku": event.sku,
            "crop": event.crop.model_dump_json() if event.crop is not None else None,
            "version": event.version,
            "event_time": event.event_time,
            "request_id": request_id or None,
            "outcome": None,
            "updated_at": now,
            "action": str(event.action),
        }
        if prev is None:
            state = ImageState.pending if event.action is Action.upsert else ImageState.deleted
            row = {"image_id": event.image_id, "state": state, "created_at": now, "reason": None, "detail": None,
                   "attempts": 0, **values}  # fmt: skip
            if inserts is None:
                conn.execute(images.insert().values(**row))
            else:
                inserts.append(row)
            return Acceptance(current=True, previous=None)
        moved = prev.sku != event.sku and prev.state == ImageState.indexed
        if event.action is Action.upsert and (prev.state != ImageState.indexed or moved):
            # an indexed image stays searchable until re-encoded, unless it left its SKU
            values.update(state=ImageState.pending, reason=None, detail=None)
        if prev.version != event.version:
            values["attempts"] = 0
        conn.execute(images.update().where(images.c.image_id == event.image_id).values(**values))
        if moved:
            return Acceptance(current=True, previous=prev, left_sku=prev.sku)
        return Acceptance(current=True, previous=prev)

    def is_current(self, image_id: str, version: str) -> bool:
        """True when ``version`` is still the newest event seen for the image and it is not deleted."""
        with self._reader.connect() as conn:
            r = conn.execute(
                sa.select(images.c.version, images.c.state).where(images.c.image_id == image_id)
            ).first()
        return r is not None and r.version == version and r.state != ImageState.deleted

    def current_versions(self, image_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``image_id -> (version, state)`` for the ids that have a row."""
        out: dict[str, tuple[str, str]] = {}
        with self._reader.connect() as conn:
            for chunk in _chunks(list(image_ids), 500):
                for r in conn.execute(
                    sa.select(images.c.image_id, images.c.version, images.c.state).where(
                        images.c.image_id.in_(chunk)
                    )
                ):
                    out[r.image_id] = (r.version, r.state)
        return out

    # --- outcomes ------------------------------------------------------------------------------

    def mark_unchanged(self, image_id: str, version: str, request_id: str = "") -> None:
        """The content, model and preprocessing are the same as indexed: nothing to encode."""
        with self.engine.begin() as conn:
            conn.execute(
                images.update()
                .where(images.c.image_id == image_id, images.c.version == version)
                .values(outcome="unchanged", request_id=request_id or images.c.request_id, updated_at=_now())
            )

    def claim(self, image_ids: Iterable[str]) -> IndexClaim:
        """Open a transaction that holds ``image_ids``' rows (PostgreSQL: ``FOR UPDATE``, in id order;
        SQLite: ``BEGIN IMMEDIATE`` holds the file) until :meth:`mark_indexed` records in it or
        :meth:`IndexClaim.release` drops it. No newer event can be accepted for them meanwhile, so a
        vector written to Milvus under the claim for a version the claim holds is never overwritten
        by an older one: writes to Milvus happen in the order of the ledger's versions."""
        conn = self.engine.connect()
        try:
            conn.begin()
            current: dict[str, tuple[str, str]] = {}  # image_id -> (version, sku) of live rows
            for chunk in _chunks(sorted(set(image_ids)), 500):
                q = (
                    sa.select(images.c.image_id, images.c.version, images.c.sku)
                    .where(images.c.image_id.in_(chunk), images.c.state.not_in((ImageState.deleted, ImageState.failed)))
                    .order_by(images.c.image_id)
                )
                for r in conn.execute(q.with_for_update() if self.locks_rows else q):
                    current[r.image_id] = (r.version, r.sku)
        except BaseException:
            conn.close()  # rolls back
            raise
        return IndexClaim(conn, current)

    def mark_indexed(self, done: Sequence[IndexedImage], claim: IndexClaim | None = None) -> tuple[list[str], set[str]]:
        """Record vectors Milvus accepted and mark their SKUs dirty, in one transaction: ``claim``'s
        (which it commits and closes), or one of its own.

        Every model version remembers which vector it holds (``image_vectors``); the image's own state
        follows the serving version. Returns the image ids recorded and the SKUs marked; ids whose
        version was overtaken (a newer event arrived meanwhile) are left to the newer event.
        """
        if claim is None:
            claim = self.claim(d.image_id for d in done)
        try:
            out = self._record_indexed(claim, done)
            claim.conn.commit()
        finally:
            claim.release()
        return out

    def _record_indexed(self, claim: IndexClaim, done: Sequence[IndexedImage]) -> tuple[list[str], set[str]]:
        conn = claim.conn
        now = _now()
        recorded: list[str] = []
        dirty: set[str] = set()
        statuses = {
            r.model_id: r.status
            for r in conn.execute(
                sa.select(index_versions.c.model_id, index_versions.c.status).where(
                    index_versions.c.model_id.in_(sorted({d.model_id for d in done}))
                )
            )
        }
        vector_rows: dict[tuple[str, str], dict] = {}  # one per (image, model): a multi-row upsert must not repeat a key
        serving_rows: dict[str, dict] = {}
        for item in done:
            if not claim.holds(item.image_id, item.version):
                continue  # overtaken by a newer event, deleted or failed
            sku = claim.current[item.image_id][1]
            vector_rows[(item.image_id, item.model_id)] = {
                "image_id": item.image_id, "model_id": item.model_id, "version": item.version, "sku": sku,
                "content_hash": item.content_hash, "indexed_at": now,
            }  # fmt: skip
            if statuses.get(item.model_id) == VersionStatus.serving:
                serving_rows[item.image_id] = {"b_id": item.image_id, "b_hash": item.content_hash, "b_model": item.model_id}
            recorded.append(item.image_id)
            dirty.add(sku)
        if vector_rows:
            self._put_vectors(conn, list(vector_rows.values()))
        if serving_rows:
            self._set_indexed(conn, list(serving_rows.values()), now)
        self._mark_dirty(conn, dirty, now)
        return recorded, dirty

    @staticmethod
    def _forget_vectors(conn: Connection, row: ImageRow, now: datetime) -> bool:
        """Drop ``row``'s vector records (of every version); an indexed image waits again, pending.
        Returns True when it left its SKU (to mark dirty)."""
        conn.execute(image_vectors.delete().where(image_vectors.c.image_id == row.image_id))
        if row.state != ImageState.indexed:
            return False
        conn.execute(images.update().where(images.c.image_id == row.image_id).values(state=ImageState.pending, updated_at=now))
        return True

    @staticmethod
    def _put_vectors(conn: Connection, rows: list[dict]) -> None:
        """Upsert ``image_vectors`` rows (no key twice). PostgreSQL: one statement over arrays
        (``unnest``), not one execution per row; elsewhere (SQLite, in-process) one per row."""
        if conn.dialect.name == "postgresql":
            cols = ("image_id", "model_id", "version", "sku", "content_hash")
            conn.execute(
                sa.text(
                    f"INSERT INTO image_vectors ({', '.join(cols)}, indexed_at) "
                    f"SELECT {', '.join('u.' + c for c in cols)}, :now FROM unnest("
                    + ", ".join(f"CAST(:{c} AS varchar[])" for c in cols)
                    + f") AS u({', '.join(cols)}) ON CONFLICT (image_id, model_id) DO UPDATE SET "
                    "version = excluded.version, sku = excluded.sku, content_hash = excluded.content_hash, "
                    "indexed_at = excluded.indexed_at"
                ),
                {"now": rows[0]["indexed_at"], **{c: [r[c] for r in rows] for c in cols}},
            )
            return
        ins = _dialect_insert(conn)(image_vectors)
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=[image_vectors.c.image_id, image_vectors.c.model_id],
                set_={c: ins.excluded[c] for c in ("version", "sku", "content_hash", "indexed_at")},
            ),
            rows,
        )

    @staticmethod
    def _set_indexed(conn: Connection, rows: list[dict], now: datetime) -> None:
        """Mark images indexed with their content hash and model (``b_id``, ``b_hash``, ``b_model``).
        PostgreSQL: one ``UPDATE … FROM unnest(…)``; elsewhere one execution per image."""
        if conn.dialect.name == "postgresql":
            conn.execute(
                sa.text(
                    "UPDATE images SET state = :state, outcome = 'indexed', reason = NULL, detail = NULL, "
                    "content_hash = u.h, model_id = u.m, updated_at = :now, indexed_at = :now "
                    "FROM unnest(CAST(:ids AS varchar[]), CAST(:hashes AS varchar[]), CAST(:models AS varchar[])) "
                    "AS u(id, h, m) WHERE images.image_id = u.id"
                ),
                {
                    "state": str(ImageState.indexed), "now": now, "ids": [r["b_id"] for r in rows],
                    "hashes": [r["b_hash"] for r in rows], "models": [r["b_model"] for r in rows],
                },
            )  # fmt: skip
            return
        conn.execute(
            images.update()
            .where(images.c.image_id == sa.bindparam("b_id"))
            .values(
                state=ImageState.indexed, outcome="indexed", reason=None, detail=None, content_hash=sa.bindparam("b_hash"),
                model_id=sa.bindparam("b_model"), updated_at=now, indexed_at=now,
            ),
            rows,
        )  # fmt: skip

    def vector_rows(self, image_id: str) -> dict[str, tuple[str, str]]:
        """``model_id -> (content_hash, sku)`` of the vectors each model version holds for an image."""
        with self._reader.connect() as conn:
            return self._vector_rows(conn, [image_id])[image_id]

    def known_images(self, image_ids: Sequence[str]) -> dict[str, KnownImage]:
        """Each image's row and :meth:`vector_rows`, for many images in one read transaction (two
        queries): what the preprocess stage reads per image, read ahead for a batch message."""
        ids = sorted(set(image_ids))
        with self._reader.connect() as conn:
            rows = self._get_many(conn, ids, lock=False)
            held = self._vector_rows(conn, ids)
        return {i: KnownImage(rows.get(i), held[i]) for i in ids}

    @staticmethod
    def _vector_rows(conn: Connection, image_ids: list[str]) -> dict[str, dict[str, tuple[str, str]]]:
        out: dict[str, dict[str, tuple[str, str]]] = {i: {} for i in image_ids}
        cols = (image_vectors.c.image_id, image_vectors.c.model_id, image_vectors.c.content_hash, image_vectors.c.sku)
        for chunk in _chunks(image_ids, 500):
            for r in conn.execute(sa.select(*cols).where(image_vectors.c.image_id.in_(chunk))):
                out[r.image_id][r.model_id] = (r.content_hash, r.sku)
        return out

    def mark_failed(
        self, image_id: str, version: str, reason: Reason, detail: str, request_id: str = ""
    ) -> bool:
        """Record a permanent failure. An image that was indexed leaves the index (and its SKU): the
        caller removes its vectors from Milvus."""
        now = _now()
        with self.engine.begin() as conn:
            prev = self._get(conn, image_id, lock=True)
            if prev is None or prev.version != version:
                return False
            conn.execute(
                images.update()
                .where(images.c.image_id == image_id)
                .values(
                    state=ImageState.failed,
                    outcome="failed",
                    reason=str(reason),
                    detail=detail[:2000],
                    request_id=request_id or prev.request_id,
                    updated_at=now,
                )
            )
            conn.execute(image_vectors.delete().where(image_vectors.c.image_id == image_id))
            if prev.state == ImageState.indexed:
                self._mark_dirty(conn, [prev.sku], now)
        return True

    def note_attempt(self, image_id: str, version: str, reason: Reason, detail: str) -> int:
        """Count a transient failure; returns the attempts so far."""
        with self.engine.begin() as conn:
            row = conn.execute(
                images.update()
                .where(images.c.image_id == image_id, images.c.version == version)
                .values(attempts=images.c.attempts + 1, reason=str(reason), detail=detail[:2000], updated_at=_now())
                .returning(images.c.attempts)
            ).first()
        return int(row.attempts) if row else 0

    def mark_deleted(self, image_id: str, version: str) -> str | None:
        """Record a delete; returns the SKU to refresh when the image was a member."""
        now = _now()
        with self.engine.begin() as conn:
            prev = self._get(conn, image_id, lock=True)
            if prev is None or prev.version != version:
                return None
            conn.execute(
                images.update()
                .where(images.c.image_id == image_id)
                .values(state=ImageState.deleted, outcome="indexed", updated_at=now)
            )
            conn.execute(image_vectors.delete().where(image_vectors.c.image_id == image_id))
            self._mark_dirty(conn, [prev.sku], now)
            return prev.sku

    def vectors_lost(self, image_id: str) -> ImageRow | None:
        """An image's vectors were removed from every active version for a delete that a newer upsert
        overtook meanwhile: the ledger no longer counts on them (an indexed image waits, pending, and
        leaves its SKU). Returns its row, whose newest event must run again (it may have found its
        content unchanged), or None when nothing is owed (gone, failed, or a delete on its way)."""
        now = _now()
        with self.engine.begin() as conn:
            row = self._get(conn, image_id, lock=True)
            if _owes_no_vector(row):
                return None
            if self._forget_vectors(conn, row, now):
                self._mark_dirty(conn, [row.sku], now)
        return row

    # --- SKUs ----------------------------------------------------------------------------------

    def mark_dirty(self, sku_ids: Iterable[str]) -> None:
        with self.engine.begin() as conn:
            self._mark_dirty(conn, sku_ids, _now())

    def sku_generation(self, sku: str) -> tuple[int, int]:
        """``(dirty_gen, clean_gen)`` of a SKU; (0, 0) when unknown."""
        with self._reader.connect() as conn:
            r = conn.execute(sa.select(skus.c.dirty_gen, skus.c.clean_gen).where(skus.c.sku == sku)).first()
        return (int(r.dirty_gen), int(r.clean_gen)) if r else (0, 0)

    def sku_generations(self, sku_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``sku -> (dirty_gen, clean_gen)``; (0, 0) for unknown SKUs."""
        out = {s: (0, 0) for s in sku_ids}
        with self._reader.connect() as conn:
            for chunk in _chunks(list(sku_ids), 500):
                for r in conn.execute(
                    sa.select(skus.c.sku, skus.c.dirty_gen, skus.c.clean_gen).where(skus.c.sku.in_(chunk))
                ):
                    out[r.sku] = (int(r.dirty_gen), int(r.clean_gen))
        return out

    def dirty_skus(self) -> list[str]:
        """SKUs awaiting a refresh."""
        with self._reader.connect() as conn:
            return list(conn.execute(sa.select(skus.c.sku).where(skus.c.dirty_gen > skus.c.clean_gen)).scalars())

    def sku_members(self, sku: str, model_id: str) -> list[str]:
        """Image ids currently indexed under ``sku`` whose vector ``model_id``'s version holds."""
        return self.sku_members_many([sku], model_id)[sku]

    def sku_members_many(self, sku_ids: Sequence[str], model_id: str) -> dict[str, list[str]]:
        """:meth:`sku_members` of many SKUs in one query per 500: ``sku -> sorted image ids``."""
        out: dict[str, list[str]] = {s: [] for s in sku_ids}
        with self._reader.connect() as conn:
            for chunk in _chunks(list(sku_ids), 500):
                rows = conn.execute(
                    sa.select(images.c.sku, images.c.image_id)
                    .join(
                        image_vectors,
                        sa.and_(
                            image_vectors.c.image_id == images.c.image_id,
                            image_vectors.c.model_id == model_id,
                            image_vectors.c.sku == images.c.sku,
                        ),
                    )
                    .where(images.c.sku.in_(chunk), images.c.state == ImageState.indexed)
                    .order_by(images.c.sku, images.c.image_id)
                )
                for r in rows:
                    out[r.sku].append(r.image_id)
        return out

    def finish_sku(self, sku: str, generation: int, image_count: int, model_id: str) -> bool:
        """Record a SKU refresh computed after reading ``generation``.

        Returns True when the SKU changed again meanwhile (the caller must recompute).
        """
        return bool(self.finish_skus([(sku, generation, image_count)], model_id))

    def finish_skus(self, done: Sequence[tuple[str, int, int]], model_id: str) -> list[str]:
        """:meth:`finish_sku` for many ``(sku, generation, image_count)`` in one transaction; returns the
        SKUs that changed again meanwhile."""
        now = _now()
        top = sa.func.max if self.engine.dialect.name == "sqlite" else sa.func.greatest
        with self.engine.begin() as conn:
            current: dict[str, int] = {}
            for chunk in _chunks(sorted({d[0] for d in done}), 500):
                for r in conn.execute(sa.select(skus.c.sku, skus.c.dirty_gen).where(skus.c.sku.in_(chunk))):
                    current[r.sku] = int(r.dirty_gen)
            conn.execute(
                skus.update()
                .where(skus.c.sku == sa.bindparam("b_sku"))
                .values(
                    clean_gen=top(skus.c.clean_gen, sa.bindparam("b_gen")),
                    image_count=sa.bindparam("b_count"),
                    model_id=model_id,
                    updated_at=now,
                ),
                [{"b_sku": sku, "b_gen": gen, "b_count": count} for sku, gen, count in sorted(done)],  # key order
            )
        return [sku for sku, gen, _ in done if current.get(sku, 0) != gen]

    # --- index versions ----------------------------------------------------------------------

    def register_version(
        self, model_id: str, spec: str, images_collection: str, skus_collection: str, dim: int, *, serve_if_first: bool
    ) -> VersionRow:
        """Remember a model version (idempotent). With ``serve_if_first`` it becomes the serving version
        when none serves yet (a fresh install's first worker); otherwise a new version is ``building``."""
        now = _now()
        with self.engine.begin() as conn:
            self._lock_versions(conn)
            row = conn.execute(sa.select(index_versions).where(index_versions.c.model_id == model_id)).first()
            if row is None:
                conn.execute(
                    index_versions.insert().values(
                        model_id=model_id,
                        spec=spec,
                        images_collection=images_collection,
                        skus_collection=skus_collection,
                        dim=dim,
                        created_at=now,
                        status=VersionStatus.building,
                    )
                )
            elif row.spec is None or row.status == VersionStatus.retired:
                update: dict = {"spec": row.spec or spec}
                if row.status == VersionStatus.retired:
                    update["status"] = VersionStatus.building
                conn.execute(index_versions.update().where(index_versions.c.model_id == model_id).values(**update))
            if serve_if_first and self._serving(conn) is None:
                conn.execute(
                    index_versions.update()
                    .where(index_versions.c.model_id == model_id)
                    .values(status=VersionStatus.serving, activated_at=now)
                )
            return _version(conn.execute(sa.select(index_versions).where(index_versions.c.model_id == model_id)).one())

    def versions(self, statuses: Sequence[str] = VersionStatus.ACTIVE) -> list[VersionRow]:
        """Model versions with one of ``statuses``, serving first, then newest first."""
        order = sa.case((index_versions.c.status == VersionStatus.serving, 0), else_=1)
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(index_versions)
                .where(index_versions.c.status.in_(list(statuses)))
                .order_by(order, index_versions.c.created_at.desc())
            )
            return [_version(r) for r in rows]

    def version(self, model_id: str) -> VersionRow | None:
        with self._reader.connect() as conn:
            r = conn.execute(sa.select(index_versions).where(index_versions.c.model_id == model_id)).first()
        return _version(r) if r is not None else None

    def serving_version(self) -> VersionRow | None:
        with self._reader.connect() as conn:
            return self._serving(conn)

    def set_serving(self, model_id: str) -> VersionRow | None:
        """Cutover: ``model_id`` serves, the version that served becomes ``standby`` (kept in sync for a
        rollback) and an older standby is retired. Returns the version that served before."""
        now = _now()
        with self.engine.begin() as conn:
            self._lock_versions(conn)
            before = self._serving(conn)
            if before is not None and before.model_id == model_id:
                return before
            conn.execute(
                index_versions.update()
                .where(index_versions.c.status == VersionStatus.standby, index_versions.c.model_id != model_id)
                .values(status=VersionStatus.retired)
            )
            if before is not None:
                conn.execute(
                    index_versions.update()
                    .where(index_versions.c.model_id == before.model_id)
                    .values(status=VersionStatus.standby)
                )
            conn.execute(
                index_versions.update()
                .where(index_versions.c.model_id == model_id)
                .values(status=VersionStatus.serving, activated_at=now)
            )
            # images the new version holds a current vector for are indexed in it; the others wait
            covered = sa.select(image_vectors.c.image_id).where(self._current_vector(model_id)).exists()
            conn.execute(
                images.update()
                .where(images.c.state == ImageState.indexed, ~covered)
                .values(state=ImageState.pending, outcome=None, updated_at=now)
            )
            conn.execute(
                images.update().where(images.c.state == ImageState.indexed).values(model_id=model_id)
            )
            return before

    def retire(self, model_id: str) -> None:
        """Stop writing to a version that does not serve."""
        with self.engine.begin() as conn:
            self._lock_versions(conn)
            conn.execute(
                index_versions.update()
                .where(index_versions.c.model_id == model_id, index_versions.c.status != VersionStatus.serving)
                .values(status=VersionStatus.retired)
            )

    def coverage(self, model_id: str, image_ids: Sequence[str] | None = None) -> Coverage:
        """How many indexed images (of ``image_ids``, or all) ``model_id``'s version holds a vector of the
        current content for."""
        current = self._current_vector(model_id)
        base = sa.select(sa.func.count()).select_from(images).where(images.c.state == ImageState.indexed)
        covered_q = (
            sa.select(sa.func.count())
            .select_from(images.join(image_vectors, current))
            .where(images.c.state == ImageState.indexed)
        )
        total = covered = 0
        with self._reader.connect() as conn:
            if image_ids is None:
                total = int(conn.execute(base).scalar_one())
                covered = int(conn.execute(covered_q).scalar_one())
            else:
                for chunk in _chunks(list(image_ids), 500):
                    total += int(conn.execute(base.where(images.c.image_id.in_(chunk))).scalar_one())
                    covered += int(conn.execute(covered_q.where(images.c.image_id.in_(chunk))).scalar_one())
        return Coverage(model_id, covered, total)

    def held_by(self, model_id: str, image_ids: Sequence[str]) -> set[str]:
        """Those of ``image_ids`` that ``model_id``'s version holds a vector of the current content for."""
        held: set[str] = set()
        with self._reader.connect() as conn:
            for chunk in _chunks(list(image_ids), 500):
                q = (
                    sa.select(images.c.image_id)
                    .join(image_vectors, self._current_vector(model_id))
                    .where(images.c.image_id.in_(chunk))
                )
                held.update(conn.execute(q).scalars())
        return held

    @staticmethod
    def _current_vector(model_id: str) -> sa.ColumnElement[bool]:
        return sa.and_(
            image_vectors.c.image_id == images.c.image_id,
            image_vectors.c.model_id == model_id,
            image_vectors.c.content_hash == images.c.content_hash,
            image_vectors.c.sku == images.c.sku,
        )

    def _serving(self, conn: Connection) -> VersionRow | None:
        r = conn.execute(sa.select(index_versions).where(index_versions.c.status == VersionStatus.serving)).first()
        return _version(r) if r is not None else None

    def _lock_versions(self, conn: Connection) -> None:
        """Serialize changes of version status (SQLite: BEGIN IMMEDIATE already does)."""
        if self.engine.dialect.name == "postgresql":
            conn.execute(sa.text("LOCK TABLE index_versions IN SHARE ROW EXCLUSIVE MODE"))

    def model_for_collection(self, images_collection: str) -> str | None:
        """The model id whose images live in ``images_collection``."""
        with self._reader.connect() as conn:
            return conn.execute(
                sa.select(index_versions.c.model_id).where(
                    index_versions.c.images_collection == images_collection
                )
            ).scalar()

    def indexed_since(self, since: datetime) -> int:
        """Images indexed at or after ``since`` (for rates)."""
        with self._reader.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(images).where(images.c.indexed_at >= since)
                ).scalar_one()
            )

    #: consecutive indexed images further apart than this (seconds) belong to separate bursts, and
    #: the idle time between bursts is left out of :meth:`indexing_rate`
    RATE_BURST_GAP_SECONDS = 30.0
    #: :meth:`indexing_rate` reads at most this many of the most recently indexed images
    RATE_SAMPLE_IMAGES = 10_000

    def indexing_rate(self, since: datetime) -> float | None:
        """Images per second while indexing ran since ``since``: the most recent images indexed (at
        most ``RATE_SAMPLE_IMAGES``), over the time indexing was busy. Busy time is the span of each
        burst (split wherever consecutive images are more than ``RATE_BURST_GAP_SECONDS`` apart; at
        least a second each), never the window or the idle gaps (two bursts 4 minutes apart are the
        bursts' rate, not 13 images in 4 minutes); None when none was indexed."""
        with self._reader.connect() as conn:
            stamps = list(
                conn.execute(
                    sa.select(images.c.indexed_at)
                    .where(images.c.indexed_at >= since)
                    .order_by(images.c.indexed_at.desc())
                    .limit(self.RATE_SAMPLE_IMAGES)
                ).scalars()
            )
        if not stamps:
            return None
        busy, burst_end, newer = 0.0, stamps[0], stamps[0]  # newest first: walk back in time
        for older in stamps[1:]:
            if (newer - older).total_seconds() > self.RATE_BURST_GAP_SECONDS:  # idle gap: a burst began at `newer`
                busy += max(1.0, (burst_end - newer).total_seconds())
                burst_end = older
            newer = older
        busy += max(1.0, (burst_end - stamps[-1]).total_seconds())
        return len(stamps) / busy

    # --- reads for the CLI ---------------------------------------------------------------------

    def get(self, image_id: str) -> ImageRow | None:
        with self._reader.connect() as conn:
            return self._get(conn, image_id, lock=False)

    def finished_rows(self, request_id: str, since: datetime | None = None) -> list[ImageRow]:
        """Rows of request ``request_id`` that have an outcome, changed at or after ``since`` (by the
        writers' clocks); uses the request_id index, so a poll costs what changed, not what waits."""
        query = sa.select(images).where(images.c.request_id == request_id, images.c.outcome.is_not(None))
        if since is not None:
            query = query.where(images.c.updated_at >= since)
        with self._reader.connect() as conn:
            return [row for r in conn.execute(query) if (row := _row(r)) is not None]

    def rows(self, image_ids: Sequence[str]) -> dict[str, ImageRow]:
        out: dict[str, ImageRow] = {}
        with self._reader.connect() as conn:
            for chunk in _chunks(list(image_ids), 500):
                for r in conn.execute(sa.select(images).where(images.c.image_id.in_(chunk))):
                    row = _row(r)
                    assert row is not None
                    out[row.image_id] = row
        return out

    def select(
        self,
        *,
        sku: str | None = None,
        uri_prefix: str | None = None,
        states: Sequence[str] = (ImageState.pending, ImageState.indexed, ImageState.failed),
    ) -> list[ImageRow]:
        """Images in a re-index scope (by SKU, uri prefix and state), ordered by uri."""
        q = sa.select(images).where(images.c.state.in_(list(states)))
        if sku:
            q = q.where(images.c.sku == sku)
        if uri_prefix:
            escaped = uri_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            q = q.where(
                images.c.uri.like(escaped + "%", escape="\\"),
                # SQLite's LIKE ignores ASCII case: the prefix must also match exactly ("Cat/" is not "cat/")
                sa.func.substr(images.c.uri, 1, len(uri_prefix)) == uri_prefix,
            )
        with self._reader.connect() as conn:
            return [r for r in (_row(x) for x in conn.execute(q.order_by(images.c.uri))) if r is not None]

    def failures(
        self,
        *,
        reason: str | None = None,
        sku: str | None = None,
        since: datetime | None = None,
        limit: int = 1000,
    ) -> list[ImageRow]:
        """Failed images, newest first, filtered by reason, SKU and time."""
        q = sa.select(images).where(images.c.state == ImageState.failed)
        if reason:
            q = q.where(images.c.reason == reason)
        if sku:
            q = q.where(images.c.sku == sku)
        if since is not None:
            q = q.where(images.c.updated_at >= since)
        q = q.order_by(images.c.updated_at.desc(), images.c.image_id).limit(limit)
        with self._reader.connect() as conn:
            return [r for r in (_row(x) for x in conn.execute(q)) if r is not None]

    def failure_counts(self) -> dict[str, int]:
        """Failed images by reason."""
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(images.c.reason, sa.func.count())
                .where(images.c.state == ImageState.failed)
                .group_by(images.c.reason)
            )
            return {str(reason): int(n) for reason, n in rows}

    def counts(self) -> dict[str, int]:
        """Images by state (every state present, zero included)."""
        out = {s: 0 for s in ImageState.ALL}
        with self._reader.connect() as conn:
            for state, n in conn.execute(sa.select(images.c.state, sa.func.count()).group_by(images.c.state)):
                out[state] = int(n)
        return out

    def sku_counts(self) -> tuple[int, int]:
        """``(skus known, skus awaiting refresh)``."""
        with self._reader.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(skus)).scalar_one()
            dirty = conn.execute(
                sa.select(sa.func.count()).select_from(skus).where(skus.c.dirty_gen > skus.c.clean_gen)
            ).scalar_one()
        return int(total), int(dirty)

    # --- work nobody carries any more (see worker.redrive) -------------------------------------

    def _stalled(self) -> sa.ColumnElement[bool]:
        """An accepted event that never finished: the image is pending, or indexed with a newer event
        waiting (accept clears the outcome; unchanged/indexed/failed/deleted set it)."""
        return sa.or_(
            images.c.state == ImageState.pending,
            sa.and_(images.c.state == ImageState.indexed, images.c.outcome.is_(None)),
        )

    def stalled_images(self, idle_since: datetime, limit: int = 10_000) -> list[ImageRow]:
        """Images whose newest event has waited since before ``idle_since`` with no step recorded, oldest first."""
        q = (
            sa.select(images)
            .where(self._stalled(), images.c.updated_at < idle_since)
            .order_by(images.c.updated_at, images.c.image_id)
            .limit(limit)
        )
        with self._reader.connect() as conn:
            return [r for r in (_row(x) for x in conn.execute(q)) if r is not None]

    def oldest_waiting_seconds(self) -> float | None:
        """Seconds since the last step of the oldest image whose newest event is not processed yet;
        None when none waits."""
        with self._reader.connect() as conn:
            oldest = conn.execute(sa.select(sa.func.min(images.c.updated_at)).where(self._stalled())).scalar()
        if oldest is None:
            return None
        if oldest.tzinfo is None:  # SQLite gives naive datetimes (stored in UTC)
            oldest = oldest.replace(tzinfo=UTC)
        return max(0.0, (_now() - oldest).total_seconds())

    def stalled_count(self, idle_since: datetime) -> int:
        """Images whose newest event has waited since before ``idle_since`` with no step recorded."""
        with self._reader.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(images)
                    .where(self._stalled(), images.c.updated_at < idle_since)
                ).scalar_one()
            )

    def stalled_skus(self, idle_since: datetime, limit: int = 10_000) -> list[str]:
        """SKUs marked dirty before ``idle_since`` and not refreshed since."""
        q = (
            sa.select(skus.c.sku)
            .where(skus.c.dirty_gen > skus.c.clean_gen, skus.c.updated_at < idle_since)
            .order_by(skus.c.updated_at, skus.c.sku)
            .limit(limit)
        )
        with self._reader.connect() as conn:
            return [r.sku for r in conn.execute(q)]

    def touch_stalled(
        self, image_ids: Sequence[str], sku_ids: Sequence[str], idle_since: datetime
    ) -> tuple[list[str], list[str]]:
        """Restart the idle clock of stalled work about to be sent again; returns the image ids and SKUs
        still stalled (the others moved on meanwhile and must not be sent).

        Rows are locked first, in key order, skipping rows another transaction holds: a row under an
        encode's claim or an accept is being worked on, not stalled, and an UPDATE over an IN list
        would lock in whatever order its plan reads, crossing a claim's id order (a deadlock)."""
        now = _now()
        out_images: list[str] = []
        out_skus: list[str] = []
        with self.engine.begin() as conn:
            for chunk in _chunks(sorted(set(image_ids)), 500):
                ids = self._lock_skipping(
                    conn, images.c.image_id, chunk, self._stalled(), images.c.updated_at < idle_since
                )
                if ids:
                    conn.execute(images.update().where(images.c.image_id.in_(ids)).values(updated_at=now))
                out_images += ids
            for chunk in _chunks(sorted(set(sku_ids)), 500):
                ids = self._lock_skipping(
                    conn, skus.c.sku, chunk, skus.c.dirty_gen > skus.c.clean_gen, skus.c.updated_at < idle_since
                )
                if ids:
                    conn.execute(skus.update().where(skus.c.sku.in_(ids)).values(updated_at=now))
                out_skus += ids
        return out_images, out_skus

    def _lock_skipping(
        self, conn: Connection, key: sa.Column, chunk: list[str], *where: sa.ColumnElement[bool]
    ) -> list[str]:
        """The keys of ``chunk`` whose rows match ``where``, locked in key order, skipping locked rows
        (PostgreSQL; SQLite's write transaction holds the whole file)."""
        q = sa.select(key).where(key.in_(chunk), *where).order_by(key)
        if self.locks_rows:
            q = q.with_for_update(skip_locked=True)
        return list(conn.execute(q).scalars())

    # --- helpers -------------------------------------------------------------------------------

    def _get_many(self, conn: Connection, image_ids: list[str], *, lock: bool) -> dict[str, ImageRow]:
        out: dict[str, ImageRow] = {}
        for chunk in _chunks(image_ids, 500):
            q = sa.select(images).where(images.c.image_id.in_(chunk)).order_by(images.c.image_id)
            if lock and self.locks_rows:
                q = q.with_for_update()
            out.update((row.image_id, row) for row in (_row(r) for r in conn.execute(q)) if row is not None)
        return out

    def _get(self, conn: Connection, image_id: str, *, lock: bool) -> ImageRow | None:
        q = sa.select(images).where(images.c.image_id == image_id)
        if lock and self.locks_rows:
            q = q.with_for_update()
        return _row(conn.execute(q).first())

    def _mark_dirty(self, conn: Connection, sku_ids: Iterable[str], now: datetime) -> None:
        ids = sorted(set(sku_ids))  # sorted: a stable lock order between writers
        if not ids:
            return
        if conn.dialect.name == "postgresql":  # one statement over an array, not one execution per SKU
            conn.execute(
                sa.text(
                    "INSERT INTO skus (sku, dirty_gen, clean_gen, image_count, updated_at) "
                    "SELECT s, 1, 0, 0, :now FROM unnest(CAST(:ids AS varchar[])) WITH ORDINALITY AS u(s, n) ORDER BY n "
                    "ON CONFLICT (sku) DO UPDATE SET dirty_gen = skus.dirty_gen + 1, updated_at = excluded.updated_at"
                ),
                {"ids": ids, "now": now},
            )
            return
        conn.execute(_sku_upsert(conn, now), [{"sku": sku} for sku in ids])


def _records(row: ImageRow, event: ImageEvent, request_id: str) -> bool:
    """True when ``row`` holds ``event`` of request ``request_id`` as accepted and not yet processed:
    accepting it again would change nothing but the clock."""
    crop = event.crop.model_dump_json() if event.crop is not None else None
    return (
        event.action is Action.upsert
        and row.state in (ImageState.pending, ImageState.indexed)
        and row.outcome is None
        and (row.version, row.request_id, row.uri, row.sku, row.crop, row.action)
        == (event.version, request_id or None, event.uri, event.sku, crop, str(event.action))
    )


def _version(r: sa.Row) -> VersionRow:
    m = r._mapping
    return VersionRow(**{f: m[f] for f in VersionRow.__dataclass_fields__})


def _dialect_insert(conn: Connection):  # type: ignore[no-untyped-def]
    """The ``insert`` construct with ``on_conflict_do_update`` of this connection's database."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _sku_upsert(conn: Connection, now: datetime) -> sa.Insert:
    """Insert a dirty SKU row (parameter ``sku``), or bump its dirty generation when it exists."""
    stmt = _dialect_insert(conn)(skus).values(dirty_gen=1, clean_gen=0, image_count=0, updated_at=now)
    return stmt.on_conflict_do_update(
        index_elements=[skus.c.sku], set_={"dirty_gen": skus.c.dirty_gen + 1, "updated_at": now}
    )


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
