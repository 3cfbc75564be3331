"""Run models over an evaluation sample (vectors, speed, memory) and check the serving ANN index
against exact search. The math is in :mod:`worker.evaluate`."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from config.settings import Settings
from schemas.evaluation import AnnRecall, EvaluationOutput, ModelEvaluation, SampleInfo
from worker.encoders import Encoder, create_encoder
from worker.errors import ConfigError, ImgsyncError
from worker.evaluate import (
    BOOTSTRAP_RESAMPLES,
    Sample,
    SampleImage,
    ann_recall,
    bootstrap_interval,
    exact_top_k,
    per_sku_cap,
    ranking_metrics,
    silhouette_cosine,
)
from worker.ledger import ImageRow, Ledger, VersionRow, VersionStatus

if TYPE_CHECKING:
    from worker.index import MilvusStore

__all__ = ["Reporter", "ModelSource", "EncodeRun", "sample_images", "collect_vectors", "run_evaluation"]

#: images timed for the throughput of a version whose vectors come from its collection
SPEED_PROBE_IMAGES = 64
#: ANN check: stored vectors used as queries, and the k compared
ANN_QUERIES = 100
ANN_K = 10
#: vectors fetched from Milvus per call
FETCH_CHUNK = 500
#: seconds between two RSS samples while a CPU model loads and encodes
RSS_INTERVAL = 0.01


class Reporter(Protocol):
    """Progress of a long step (the CLI shows a bar)."""

    def start(self, label: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class _Silent:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


@dataclass(frozen=True)
class ModelSource:
    """A model to evaluate: a version of the index (its stored vectors are used), or a spec."""

    spec: str
    version: VersionRow | None = None


def sample_images(rows: Sequence[ImageRow]) -> list[SampleImage]:
    """The ledger's indexed images as sample candidates."""
    return [SampleImage(r.image_id, r.uri, r.sku, r.event().crop) for r in rows]


@dataclass
class EncodeRun:
    """One model's vectors of a sample, and what encoding cost."""

    model_id: str
    spec: str
    dim: int
    device: str
    batch_size: int
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # image id → reason code
    stored: set[str] = field(default_factory=set)  # image ids whose vector came from the index
    images_timed: int = 0
    seconds: float = 0.0
    parameters: int = 0
    weights_bytes: int = 0
    peak_bytes: int | None = None
    peak_method: str = "unavailable"

    @property
    def images_per_second(self) -> float | None:
        return self.images_timed / self.seconds if self.images_timed and self.seconds > 0 else None


def collect_vectors(
    settings: Settings, source: ModelSource, sample: Sample, *, ledger: Ledger, store: MilvusStore | None,
    reporter: Reporter | None = None,
) -> EncodeRun:
    """The sample's vectors under one model: a version's stored vectors where it holds the image's
    current content, the rest encoded here in batches of ``IMGSYNC_BATCH_MAX``. Encoding is timed
    (model forward only; fetch and decode are not) over at least SPEED_PROBE_IMAGES images.
    Unreadable images are left out with their reason code. The model is released at the end."""
    from worker.encoders.device import resolve_device

    reporter = reporter or _Silent()
    device = resolve_device(settings.device)
    meter = _PeakMemory(device)
    if device.type == "cuda":
        meter.begin()  # CUDA memory of loading counts; imports allocate none
    encoder = _load(settings, source, ledger)
    run = EncodeRun(encoder.model_id, source.spec, encoder.dim, str(device), settings.batch_max)
    run.parameters, run.weights_bytes = _size(encoder)
    if device.type != "cuda":
        meter.begin()  # after loading: RSS grows by library imports too, so weights are counted exactly
    if source.version is not None and store is not None:
        run.vectors = _stored(ledger, store, source.version, sample)
        run.stored = set(run.vectors)
    need = [i for i in sample.images if i.image_id not in run.vectors]
    extra = [i for i in sample.images if i.image_id in run.vectors][: max(0, SPEED_PROBE_IMAGES - len(need))]
    encoder.warmup(batch_size=min(2, settings.batch_max))
    reporter.start(f"encoding with {source.spec}", len(need) + len(extra))
    try:
        vectors = _encode(settings, encoder, need + extra, run, reporter)
    finally:
        run.peak_bytes, run.peak_method = meter.end(run.weights_bytes)
    run.vectors.update({i.image_id: vectors[i.image_id] for i in need if i.image_id in vectors})
    run.failed = {k: v for k, v in run.failed.items() if k not in run.vectors}  # a probe image has its vector
    del encoder
    _release(device)
    return run


def _load(settings: Settings, source: ModelSource, ledger: Ledger) -> Encoder:
    if source.version is not None:
        from worker.search import query_encoder

        return query_encoder(settings, ledger, source.version.model_id).load()
    return create_encoder(replace(settings.encoder, spec=source.spec)).load()


def _stored(ledger: Ledger, store: MilvusStore, version: VersionRow, sample: Sample) -> dict[str, np.ndarray]:
    held = sorted(ledger.held_by(version.model_id, [i.image_id for i in sample.images]))
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(held), FETCH_CHUNK):
        out.update(store.image_vectors(version.images_collection, held[start : start + FETCH_CHUNK]))
    return out


def _encode(
    settings: Settings, encoder: Encoder, images: Sequence[SampleImage], run: EncodeRun, reporter: Reporter
) -> dict[str, np.ndarray]:
    from worker.fetch import fetch_bytes
    from worker.pipeline import model_pixels
    from worker.runtime import Runtime

    rt = Runtime(settings)  # lazy: only its settings are used here
    out: dict[str, np.ndarray] = {}
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        started = time.perf_counter()
        vectors = encoder.encode([p for _, p in batch])
        run.seconds += time.perf_counter() - started
        run.images_timed += len(batch)
        out.update(zip((i for i, _ in batch), vectors, strict=True))
        reporter.advance(len(batch))
        batch.clear()

    for img in images:
        try:
            pixels = model_pixels(rt, fetch_bytes(img.uri, settings.fetch), img.crop, encoder)
        except ImgsyncError as exc:
            run.failed[img.image_id] = str(getattr(exc, "reason", "error"))
            reporter.advance()
            continue
        batch.append((img.image_id, pixels))
        if len(batch) >= settings.batch_max:
            flush()
    if batch:
        flush()
    return out


def _size(encoder: Encoder) -> tuple[int, int]:
    """Parameters, and bytes of parameters and buffers, of the encoder's torch module (0 without)."""
    import torch

    model = getattr(encoder, "model", None)
    if not isinstance(model, torch.nn.Module):
        return 0, 0
    params = list(model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    return sum(p.numel() for p in params), nbytes


def _release(device) -> None:  # type: ignore[no-untyped-def]
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


class _PeakMemory:
    """Peak memory of a model. CUDA: ``torch.cuda.max_memory_allocated`` over loading and encoding,
    less what was allocated before. Elsewhere: the weights' bytes plus the highest process RSS while
    encoding (sampled every RSS_INTERVAL s) above the RSS after loading; memory an earlier model
    freed may be reused, so this can read low."""

    def __init__(self, device) -> None:  # type: ignore[no-untyped-def]
        self.device = device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = self._peak = 0

    def begin(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif (rss := _rss()) is not None:
            self._base = self._peak = rss
            self._thread = threading.Thread(target=self._sample, name="imgsync-rss", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            self._peak = max(self._peak, _rss() or 0)

    def end(self, weights_bytes: int) -> tuple[int | None, str]:
        """``(bytes, method)``; method as in ``ModelEvaluation.peak_memory_method``."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self._base), "cuda_max_allocated"
        if self._thread is None:
            return None, "unavailable"
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss() or 0)
        return weights_bytes + max(0, self._peak - self._base), "rss_delta_sampled"


def _rss() -> int | None:
    """Resident set size of this process, bytes (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --- the whole run -----------------------------------------------------------------------------


def run_evaluation(
    settings: Settings, ledger: Ledger, store: MilvusStore | None, sources: Sequence[ModelSource], sample: Sample,
    *, indexed: Sequence[ImageRow], ann: bool, reporter: Reporter | None = None,
) -> EvaluationOutput:
    """Every model on the same images (those every model has a vector for), exact search; plus the
    serving collection's ANN recall when ``ann`` and a version serves.

    Raises:
        ConfigError: fewer than two SKUs with two images are left once unreadable images are dropped.
    """
    runs = [collect_vectors(settings, s, sample, ledger=ledger, store=store, reporter=reporter) for s in sources]
    common = set.intersection(*(set(r.vectors) for r in runs))
    measured = sample.restricted(common)
    notes = _failure_notes(runs)
    if measured.skus < 2:
        raise ConfigError(
            f"cannot evaluate: only {measured.skus} SKU(s) keep 2 or more readable images of the "
            f"{len(sample.images)} sampled" + (f" ({notes[0]})" if notes else "")
        )
    info = SampleInfo(
        seed=sample.seed, requested=sample.requested, images=len(measured.images), skus=measured.skus,
        queries=len(measured.images), max_per_sku=per_sku_cap(sample.requested), left_out=len(sample.images) - len(measured.images),
        key=measured.key, bootstrap_resamples=BOOTSTRAP_RESAMPLES,
    )  # fmt: skip
    models = [_score(run, source, measured) for run, source in zip(runs, sources, strict=True)]
    serving = next((s.version for s in sources if s.version and s.version.status == VersionStatus.serving), None)
    serving = serving or ledger.serving_version()
    ann_doc = None
    if ann and store is not None and serving is not None:
        ann_doc = measure_ann(settings, ledger, store, serving, measured, indexed, reporter=reporter)
    return EvaluationOutput(sample=info, models=models, ann=ann_doc, notes=notes)


def _score(run: EncodeRun, source: ModelSource, sample: Sample) -> ModelEvaluation:
    ids = [i.image_id for i in sample.images]
    labels = [i.sku for i in sample.images]
    vectors = np.stack([run.vectors[i] for i in ids])
    ranking = ranking_metrics(vectors, labels)
    return ModelEvaluation(
        model_id=run.model_id, spec=run.spec, source="version" if source.version else "spec",
        status=source.version.status if source.version else None,
        recall_at_1=ranking.recall_at_1,
        recall_at_1_ci=bootstrap_interval(ranking.hits_at_1, labels, seed=sample.seed),
        recall_at_5=ranking.recall_at_5, mean_ap=ranking.mean_ap, silhouette=silhouette_cosine(vectors, labels),
        vectors_from_index=sum(1 for i in ids if i in run.stored),
        vectors_encoded=sum(1 for i in ids if i not in run.stored), images_per_second=run.images_per_second,
        images_timed=run.images_timed, batch_size=run.batch_size, device=run.device, parameters=run.parameters,
        weights_bytes=run.weights_bytes, peak_memory_bytes=run.peak_bytes, peak_memory_method=run.peak_method,  # type: ignore[arg-type]
        dim=run.dim, index_bytes_per_million=run.dim * 4 * 1_000_000,
    )  # fmt: skip


def _failure_notes(runs: Sequence[EncodeRun]) -> list[str]:
    failed: dict[str, str] = {}
    for r in runs:
        failed.update(r.failed)
    if not failed:
        return []
    reasons = sorted(set(failed.values()))
    return [f"{len(failed)} sampled image(s) could not be read now and were left out (reasons: {', '.join(reasons)})"]


def measure_ann(
    settings: Settings, ledger: Ledger, store: MilvusStore, serving: VersionRow, sample: Sample,
    indexed: Sequence[ImageRow], *, reporter: Reporter | None = None,
) -> AnnRecall | None:
    """Recall@ANN_K of the serving collection's index against exact search over the same stored
    vectors: up to ANN_QUERIES sampled images' stored vectors are searched both ways; the exact side
    scans every vector the collection holds for the ledger's indexed images."""
    reporter = reporter or _Silent()
    everything = sorted(ledger.held_by(serving.model_id, [r.image_id for r in indexed]))
    held = set(everything)  # once: a set per sampled image made the check sample × catalog
    wanted = [i.image_id for i in sample.images if i.image_id in held][:ANN_QUERIES]
    stored = store.image_vectors(serving.images_collection, wanted)
    query_ids = [i for i in wanted if i in stored]
    if not query_ids:
        return None
    queries = np.stack([stored[i] for i in query_ids])
    reporter.start(f"exact vs ANN search of {serving.images_collection}", len(everything) + len(query_ids))
    exact_ids, exact_scores, scanned = exact_top_k(queries, _chunks(store, serving, everything, reporter), ANN_K)
    ann_hits = []
    for q in queries:
        hits = store.search(q, limit=ANN_K, collection=serving.images_collection)
        ann_hits.append([(str(h["image_id"]), float(h["score"])) for h in hits])
        reporter.advance()
    return AnnRecall(
        model_id=serving.model_id, collection=serving.images_collection,
        index_type=store.index_type(serving.images_collection) or settings.milvus_index_type,  # as built, not as set now
        k=ANN_K, queries=len(query_ids), vectors_scanned=scanned,
        recall_at_k=ann_recall(ann_hits, exact_ids, exact_scores, ANN_K),
    )  # fmt: skip


def _chunks(
    store: MilvusStore, version: VersionRow, ids: Sequence[str], reporter: Reporter
) -> Iterator[tuple[list[str], np.ndarray]]:
    for start in range(0, len(ids), FETCH_CHUNK):
        part = store.image_vectors(version.images_collection, ids[start : start + FETCH_CHUNK])
        reporter.advance(min(FETCH_CHUNK, len(ids) - start))
        if part:
            yield list(part), np.stack(list(part.values()))
