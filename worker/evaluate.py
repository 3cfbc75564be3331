"""Measure models on the catalog's own labels: images of one SKU should find each other.

Pure parts (numpy, no services): the seeded SKU-stratified sample, exact cosine ranking metrics
(Recall@1, Recall@5, mAP with the query left out of its own results), the cosine silhouette of SKUs,
a SKU-level bootstrap interval, streaming exact top-k, the ANN-vs-exact recall, and the record of
each evaluation under ``IMGSYNC_HOME/evaluations`` that ``cutover`` compares. Running the models
over a sample lives in :mod:`worker.evaluate_run`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from schemas.evaluation import ModelEvaluation, SampleInfo
from schemas.events import CropBox
from worker.encoders.base import l2_normalize
from worker.errors import ConfigError

__all__ = [
    "SampleImage",
    "Sample",
    "RankingMetrics",
    "draw_sample",
    "ranking_metrics",
    "silhouette_cosine",
    "bootstrap_interval",
    "exact_top_k",
    "ann_recall",
    "save_evaluation",
    "load_evaluations",
    "cutover_check",
    "MAX_PER_SKU",
    "BOOTSTRAP_RESAMPLES",
]

#: images drawn per SKU at most, so that a few large SKUs do not make the sample
MAX_PER_SKU = 10
#: bootstrap resamples behind the 95% interval of Recall@1
BOOTSTRAP_RESAMPLES = 1000
#: query rows of the similarity matrix held at once (memory: rows × sample size × 8 bytes)
BLOCK_ROWS = 256
#: evaluations kept per model (newest first); older samples are dropped
KEEP_PER_MODEL = 20


@dataclass(frozen=True)
class SampleImage:
    """One catalog image as the ledger knows it."""

    image_id: str
    uri: str
    sku: str
    crop: CropBox | None = None


@dataclass(frozen=True)
class Sample:
    """The images a run measures every model on, in a fixed order."""

    seed: int
    requested: int
    images: tuple[SampleImage, ...]

    @property
    def skus(self) -> int:
        return len({i.sku for i in self.images})

    @property
    def key(self) -> str:
        """Seed (of the bootstrap too), size and a digest of the image ids: two runs with one key
        measured the same images with the same interval resamples."""
        digest = hashlib.sha256("\n".join(sorted(i.image_id for i in self.images)).encode()).hexdigest()[:12]
        return f"seed{self.seed}-{len(self.images)}img-{digest}"

    def restricted(self, keep: set[str]) -> Sample:
        """The images in ``keep``, dropping SKUs left with fewer than two."""
        kept = [i for i in self.images if i.image_id in keep]
        counts: dict[str, int] = {}
        for i in kept:
            counts[i.sku] = counts.get(i.sku, 0) + 1
        return Sample(self.seed, self.requested, tuple(i for i in kept if counts[i.sku] >= 2))


def per_sku_cap(size: int, max_per_sku: int = MAX_PER_SKU) -> int:
    """Images one SKU gives a sample of ``size`` at most: a small sample still spans two SKUs."""
    return max(2, min(max_per_sku, size // 2))


def draw_sample(images: Iterable[SampleImage], size: int, seed: int, *, max_per_sku: int = MAX_PER_SKU) -> Sample:
    """Up to ``size`` images, SKU by SKU: SKUs with >= 2 images in a seeded order, each with up to
    ``max_per_sku`` of its images (seeded choice). The same catalog and seed give the same sample,
    whatever order ``images`` come in.

    Raises:
        ConfigError: fewer than two SKUs with two or more images would be sampled.
    """
    by_sku: dict[str, list[SampleImage]] = {}
    for img in images:
        by_sku.setdefault(img.sku, []).append(img)
    skus = sorted(s for s, members in by_sku.items() if len(members) >= 2)
    rng = np.random.default_rng(seed)
    chosen: list[SampleImage] = []
    per_sku = per_sku_cap(size, max_per_sku)
    for s in (skus[i] for i in rng.permutation(len(skus))):
        members = sorted(by_sku[s], key=lambda i: i.image_id)
        take = min(len(members), per_sku, size - len(chosen))
        if take < 2:
            break
        chosen.extend(members[i] for i in sorted(rng.permutation(len(members))[:take]))
    sample = Sample(seed, size, tuple(chosen))
    if sample.skus < 2:
        raise ConfigError(
            f"cannot evaluate: the catalog has {len(skus)} SKU(s) with 2 or more indexed images and "
            f"--sample {size} holds {sample.skus}; same-SKU retrieval needs at least 2"
        )
    return sample


@dataclass(frozen=True)
class RankingMetrics:
    """Exact same-SKU retrieval over a sample; every image is a query against all the others."""

    recall_at_1: float
    recall_at_5: float
    mean_ap: float
    #: per query: 1.0 when its nearest other image is of its SKU
    hits_at_1: np.ndarray
    #: per query: its average precision
    average_precision: np.ndarray


def _codes(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Integer label per row, and the size of each label's group."""
    _, codes, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True, return_counts=True)
    return codes, counts


def ranking_metrics(vectors: np.ndarray, labels: Sequence[str]) -> RankingMetrics:
    """Recall@1, Recall@5 and mAP of same-label retrieval by cosine similarity, the query left out of
    its own results. Rows whose label has no other row are not queries. Ties rank by row order.

    Recall@k: share of queries with at least one same-label row among the k most similar others.
    AP of a query: mean over its same-label rows of the precision at that row's rank.
    """
    x = l2_normalize(vectors)
    codes, counts = _codes(labels)
    queries = np.flatnonzero(counts[codes] >= 2)
    hits1, hits5, aps = [], [], []
    positions = np.arange(1, len(x))  # ranks 1..n-1 of the other rows
    for start in range(0, len(queries), BLOCK_ROWS):
        rows = queries[start : start + BLOCK_ROWS]
        sims = x[rows] @ x.T
        sims[np.arange(len(rows)), rows] = -np.inf  # the query itself ranks last, then is dropped
        order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]
        relevant = codes[order] == codes[rows][:, None]
        hits1.append(relevant[:, :1].any(axis=1))
        hits5.append(relevant[:, :5].any(axis=1))
        precision = np.cumsum(relevant, axis=1) / positions
        aps.append((precision * relevant).sum(axis=1) / relevant.sum(axis=1))
    if not hits1:
        raise ConfigError("no queries: every label has a single row")
    h1 = np.concatenate(hits1).astype(np.float64)
    ap = np.concatenate(aps)
    return RankingMetrics(float(h1.mean()), float(np.concatenate(hits5).mean()), float(ap.mean()), h1, ap)


def silhouette_cosine(vectors: np.ndarray, labels: Sequence[str]) -> float:
    """Mean silhouette of the label groups with cosine distance ``1 - cos``, in [-1, 1].

    Per row: ``a`` = mean distance to the other rows of its group, ``b`` = lowest mean distance to
    another group, ``s = (b - a) / max(a, b)``; a row alone in its group scores 0 (as scikit-learn).

    Raises:
        ConfigError: fewer than two groups.
    """
    x = l2_normalize(vectors)
    codes, counts = _codes(labels)
    if len(counts) < 2:
        raise ConfigError("the silhouette needs at least two SKUs")
    by_group = np.argsort(codes, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    scores = []
    for start in range(0, len(x), BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, len(x)))
        dist = np.clip(1.0 - x[rows].astype(np.float64) @ x.T.astype(np.float64), 0.0, 2.0)
        dist[np.arange(len(rows)), rows] = 0.0
        sums = np.add.reduceat(dist[:, by_group], starts, axis=1)  # rows × groups
        own = codes[rows]
        a = sums[np.arange(len(rows)), own] / np.maximum(counts[own] - 1, 1)
        means = sums / counts
        means[np.arange(len(rows)), own] = np.inf
        b = means.min(axis=1)
        top = np.maximum(a, b)
        s = np.where(top > 0, (b - a) / np.where(top > 0, top, 1.0), 0.0)
        scores.append(np.where(counts[own] > 1, s, 0.0))
    return float(np.concatenate(scores).mean())


def bootstrap_interval(
    values: np.ndarray, groups: Sequence[str], *, seed: int, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of ``values``, resampling whole groups (SKUs) with
    replacement: the images of one SKU are not independent queries, so resampling them one by one
    would give too narrow an interval. Seeded: the same input gives the same interval."""
    codes, counts = _codes(groups)
    sums = np.bincount(codes, weights=np.asarray(values, dtype=np.float64), minlength=len(counts))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(counts), size=(resamples, len(counts)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def exact_top_k(
    queries: np.ndarray, chunks: Iterable[tuple[Sequence[str], np.ndarray]], k: int
) -> tuple[list[list[str]], np.ndarray, int]:
    """Exact cosine top ``k`` of each query over vectors that arrive in chunks ``(ids, vectors)``.

    Returns the ids per query (best first), their similarities (queries × k, -inf where fewer than k
    vectors exist) and the number of vectors scanned."""
    q = l2_normalize(queries)
    best = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(q), k), -1, dtype=np.int64)
    names: list[str] = []
    for ids, vectors in chunks:
        if len(ids) == 0:
            continue
        sims = q @ l2_normalize(vectors).T
        offset = len(names)
        names.extend(ids)
        merged = np.concatenate([best, sims], axis=1)
        merged_ids = np.concatenate([best_ids, offset + np.broadcast_to(np.arange(len(ids)), sims.shape)], axis=1)
        keep = np.argsort(-merged, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(merged, keep, axis=1)
        best_ids = np.take_along_axis(merged_ids, keep, axis=1)
    out = [[names[j] for j in row if j >= 0] for row in best_ids]
    return out, best, len(names)


def ann_recall(
    ann: Sequence[Sequence[tuple[str, float]]], exact_ids: Sequence[Sequence[str]], exact_scores: np.ndarray, k: int,
    *, tolerance: float = 1e-4,
) -> float:
    """Share of the exact top ``k`` an ANN search returned, averaged over queries. An ANN hit outside
    the exact list still counts when its score ties the exact k-th score (within ``tolerance``)."""
    shares = []
    for hits, ids, scores in zip(ann, exact_ids, exact_scores, strict=True):
        want = min(k, len(ids))
        if want == 0:
            continue
        kth = float(scores[want - 1])
        exact = set(ids[:want])
        good = sum(1 for image_id, score in hits[:want] if image_id in exact or score >= kth - tolerance)
        shares.append(min(good, want) / want)
    return float(np.mean(shares)) if shares else 1.0


# --- the record cutover compares ---------------------------------------------------------------


def _record_path(home: Path, model_id: str) -> Path:
    readable = re.sub(r"[^0-9a-zA-Z]+", "_", model_id.split("#")[0]).strip("_")[:60]
    return home / "evaluations" / f"{readable}_{hashlib.sha256(model_id.encode()).hexdigest()[:10]}.json"


def save_evaluation(home: Path, sample: SampleInfo, result: ModelEvaluation) -> Path:
    """Keep ``result`` in ``<home>/evaluations/<model>.json`` under its sample key (the newest
    KEEP_PER_MODEL samples per model are kept). Written atomically."""
    path = _record_path(home, result.model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = {k: v for k, v in _read(path).items() if k != sample.key}
    entry = {"evaluated_at": datetime.now(timezone.utc).isoformat(), "sample": sample.model_dump(), "result": result.model_dump()}
    ordered = dict(sorted({sample.key: entry, **records}.items(), key=lambda kv: kv[1]["evaluated_at"], reverse=True))
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"model_id": result.model_id, "evaluations": dict(list(ordered.items())[:KEEP_PER_MODEL])}, indent=1))
    tmp.replace(path)
    return path


def load_evaluations(home: Path, model_id: str) -> dict[str, tuple[str, SampleInfo, ModelEvaluation]]:
    """The kept evaluations of ``model_id`` by sample key: ``(evaluated_at ISO time, sample, result)``."""
    out = {}
    for key, entry in _read(_record_path(home, model_id)).items():
        try:
            out[key] = (entry["evaluated_at"], SampleInfo(**entry["sample"]), ModelEvaluation(**entry["result"]))
        except (KeyError, TypeError, ValueError):
            continue  # a record from another imgsync version: ignored, rewritten by the next run
    return out


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc.get("evaluations", {}) if isinstance(doc, dict) else {}


def cutover_check(settings, ledger, current_model_id: str | None, target_model_id: str) -> tuple[str | None, bool]:  # type: ignore[no-untyped-def]
    """The kept evaluations of the serving and the target model side by side, for ``cutover``.

    Returns ``(text, worse)``: ``text`` is None when neither model was evaluated; ``worse`` is True
    when both were measured on one sample and the target's Recall@1 lies below the lower end of the
    serving model's 95% interval."""
    if current_model_id is None:
        return None, False
    current = load_evaluations(settings.home, current_model_id)
    target = load_evaluations(settings.home, target_model_id)
    common = sorted(set(current) & set(target), key=lambda k: min(current[k][0], target[k][0]), reverse=True)
    if not common:
        if not current and not target:
            return None, False
        return (
            f"no evaluation of both the serving model and the target on one sample: compare them with "
            f"`imgsync evaluate --model {current_model_id} --model {target_model_id}`",
            False,
        )
    key = common[0]
    when, sample, cur = current[key]
    tgt = target[key][2]
    lo, hi = cur.recall_at_1_ci
    worse = tgt.recall_at_1 < lo
    lines = [
        f"evaluation on {sample.images} images, {sample.skus} SKUs, {sample.queries} queries "
        f"(seed {sample.seed}, {when[:19]}Z, exact search)",
        f"{'':8} {'Recall@1 [95% CI]':>22} {'Recall@5':>9} {'mAP':>7} {'silh.':>7} {'img/s':>9} {'dim':>6}  model",
    ]
    for role, ev in (("serving", cur), ("target", tgt)):
        ips = f"{ev.images_per_second:.1f}" if ev.images_per_second is not None else "-"
        ci = f"{ev.recall_at_1:.3f} [{ev.recall_at_1_ci[0]:.3f}, {ev.recall_at_1_ci[1]:.3f}]"
        version = ledger.version(ev.model_id)
        spec = version.spec if version is not None and version.spec else ev.spec
        lines.append(
            f"{role:8} {ci:>22} {ev.recall_at_5:>9.3f} {ev.mean_ap:>7.3f} {ev.silhouette:>7.3f} {ips:>9} {ev.dim:>6}  "
            f"{spec} ({ev.model_id})"
        )
    if worse:
        lines.append(
            f"the target is worse on Recall@1: {tgt.recall_at_1:.3f} is below the serving model's 95% interval "
            f"[{lo:.3f}, {hi:.3f}]"
        )
    return "\n".join(lines), worse
