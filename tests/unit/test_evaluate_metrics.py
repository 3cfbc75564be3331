"""The evaluation's math against hand computations; its sample and bootstrap are deterministic."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from schemas.evaluation import ModelEvaluation, SampleInfo
from worker.errors import ConfigError
from worker.evaluate import (
    SampleImage,
    ann_recall,
    bootstrap_interval,
    cutover_check,
    draw_sample,
    exact_top_k,
    ranking_metrics,
    save_evaluation,
    silhouette_cosine,
)


def _unit(*degrees: float) -> np.ndarray:
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


# Seven 2-D vectors by angle; cosine similarity falls with the angle between them, so each query's
# ranking is its others ordered by angular distance (no two distances tie for any query).
#   A1=0°  A2=40°  |  B1=10°  B2=190°  |  C1=120°  C2=150°  C3=97°
# query  others by distance (same SKU in [brackets])        R@1 R@5  AP
# A1     B1 10, [A2 40], C3 97, C1 120, C2 150, B2 170        0   1   1/2
# A2     B1 30, [A1 40], C3 57, C1 80, C2 110, B2 150         0   1   1/2
# B1     A1 10, A2 30, C3 87, C1 110, C2 140, [B2 180]        0   0   1/6
# B2     C2 40, C1 70, C3 93, A2 150, A1 170, [B1 180]        0   0   1/6
# C1     [C3 23], [C2 30], B2 70, A2 80, B1 110, A1 120       1   1   (1/1 + 2/2)/2 = 1
# C2     [C1 30], B2 40, [C3 53], A2 110, B1 140, A1 150      1   1   (1/1 + 2/3)/2 = 5/6
# C3     [C1 23], [C2 53], A2 57, B1 87, B2 93, A1 97         1   1   (1/1 + 2/2)/2 = 1
# Recall@1 = 3/7, Recall@5 = 5/7, mAP = (1/2 + 1/2 + 1/6 + 1/6 + 1 + 5/6 + 1) / 7 = 25/42
ANGLES = (0, 40, 10, 190, 120, 150, 97)
LABELS = ("A", "A", "B", "B", "C", "C", "C")
EXPECTED_AP = [Fraction(1, 2), Fraction(1, 2), Fraction(1, 6), Fraction(1, 6), Fraction(1), Fraction(5, 6), Fraction(1)]


def test_ranking_metrics_match_the_hand_computation() -> None:
    """Recall@1, Recall@5 and per-query AP equal the hand-computed values, query left out."""
    m = ranking_metrics(_unit(*ANGLES) * np.array([[3.0], [0.5], [1], [2], [1], [7], [1]]), LABELS)  # norms don't matter
    assert m.recall_at_1 == 3 / 7
    assert m.recall_at_5 == 5 / 7
    assert m.hits_at_1.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert m.average_precision.tolist() == pytest.approx([float(f) for f in EXPECTED_AP], abs=1e-12)
    assert m.mean_ap == pytest.approx(25 / 42, abs=1e-12)


def test_rows_alone_in_their_sku_are_not_queries() -> None:
    """A SKU with one image adds a distractor to the gallery but no query."""
    vectors = np.vstack([_unit(*ANGLES), _unit(115)])  # D: nearest to C1, pushes C3/C2 down for C1
    m = ranking_metrics(vectors, [*LABELS, "D"])
    assert len(m.hits_at_1) == 7
    # C1's ranking is now [C3 23], D 5 first: D 5, [C3 23], [C2 30] → AP = (1/2 + 2/3)/2 = 7/12
    assert m.average_precision[4] == pytest.approx(7 / 12, abs=1e-12)


def test_silhouette_matches_the_hand_computation() -> None:
    """Cosine-distance silhouette of two SKUs equals the hand computation."""
    # A1=0°, A2=60°, B1=90°, B2=180°; distance 1 - cos(Δ), r = cos 30° = √3/2
    #   d(A1,A2)=1/2  d(A1,B1)=1  d(A1,B2)=2  d(A2,B1)=1-r  d(A2,B2)=3/2  d(B1,B2)=1
    # s(A1): a=1/2, b=(1+2)/2=3/2          → (3/2-1/2)/(3/2) = 2/3
    # s(A2): a=1/2, b=(1-r+3/2)/2=(5/2-r)/2 → 1 - (1/2)/b = 1 - 1/(5/2-r)
    # s(B1): a=1,   b=(1+1-r)/2=(2-r)/2 < a → (b-a)/a = -r/2
    # s(B2): a=1,   b=(2+3/2)/2=7/4        → (7/4-1)/(7/4) = 3/7
    r = math.sqrt(3) / 2
    expected = (2 / 3 + (1 - 1 / (2.5 - r)) - r / 2 + 3 / 7) / 4
    assert silhouette_cosine(_unit(0, 60, 90, 180), ["A", "A", "B", "B"]) == pytest.approx(expected, abs=1e-6)


def test_silhouette_scores_a_lone_image_zero_and_needs_two_skus() -> None:
    """A SKU of one image scores 0 (scikit-learn's convention); one SKU alone is an error."""
    two = silhouette_cosine(_unit(0, 60, 90, 180), ["A", "A", "B", "B"])
    assert silhouette_cosine(np.vstack([_unit(0, 60, 90, 180), _unit(-90)]), ["A", "A", "B", "B", "C"]) != two
    perfect = silhouette_cosine(_unit(0, 0, 180, 180), ["A", "A", "B", "B"])
    assert perfect == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="two SKUs"):
        silhouette_cosine(_unit(0, 10), ["A", "A"])


def test_bootstrap_is_seeded_and_resamples_whole_skus() -> None:
    """Same seed, same interval; SKUs with equal means give a zero-width interval (SKUs resampled)."""
    rng = np.random.default_rng(3)
    values = (rng.random(200) < 0.6).astype(float)
    groups = [f"S{i // 4}" for i in range(200)]
    first = bootstrap_interval(values, groups, seed=11)
    assert first == bootstrap_interval(values, groups, seed=11)
    assert first != bootstrap_interval(values, groups, seed=12)
    assert first[0] < values.mean() < first[1]
    # every SKU has mean 1/2: any resample of SKUs has mean exactly 1/2 (a per-query bootstrap would not)
    assert bootstrap_interval(np.array([1.0, 0.0, 0.0, 1.0]), ["A", "A", "B", "B"], seed=0) == (0.5, 0.5)
    assert bootstrap_interval(np.ones(6), list("AABBCC"), seed=0) == (1.0, 1.0)


def _catalog(n_skus: int, sizes: list[int]) -> list[SampleImage]:
    return [
        SampleImage(f"id-{s}-{i}", f"file:///c/{s}/{i}.jpg", f"SKU-{s}")
        for s in range(n_skus)
        for i in range(sizes[s % len(sizes)])
    ]


def test_sample_is_deterministic_stratified_and_bounded() -> None:
    """Same catalog and seed (in any order) give the same sample; SKUs with one image never enter;
    at most --sample images and MAX_PER_SKU per SKU, each SKU with >= 2."""
    images = _catalog(40, [1, 2, 3, 15])
    shuffled = images[:]
    random.Random(5).shuffle(shuffled)
    a, b = draw_sample(images, 50, seed=7, max_per_sku=10), draw_sample(shuffled, 50, seed=7, max_per_sku=10)
    assert a == b and a.key == b.key
    assert draw_sample(images, 50, seed=8).key != a.key
    assert len(a.images) <= 50
    counts: dict[str, int] = {}
    for img in a.images:
        counts[img.sku] = counts.get(img.sku, 0) + 1
    assert all(2 <= c <= 10 for c in counts.values())
    assert not any(img.sku in {f"SKU-{s}" for s in range(0, 40, 4)} for img in a.images)  # 1-image SKUs
    assert len({i.image_id for i in a.images}) == len(a.images)


def test_sample_needs_two_skus_with_two_images() -> None:
    """Fewer than two SKUs with >= 2 images is a ConfigError naming the problem."""
    with pytest.raises(ConfigError, match="at least 2"):
        draw_sample(_catalog(5, [1]) + _catalog(1, [3]), 100, seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        draw_sample(_catalog(5, [3]), 3, seed=0)  # room for one SKU only


@pytest.mark.parametrize("size", [4, 5, 9])
def test_a_small_sample_spans_two_skus(size: int) -> None:
    """`--sample 4` on a catalog of SKUs with 10 images each was refused ("holds 1 SKU"): the first
    SKU took every place. A sample takes at most half its size from one SKU."""
    sample = draw_sample(_catalog(10, [10]), size, seed=0)
    assert sample.skus >= 2 and 4 <= len(sample.images) <= size


def test_exact_top_k_over_chunks_equals_brute_force() -> None:
    """Streaming top-k over chunks gives the brute-force ranking."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((230, 16)).astype(np.float32)
    ids = [f"v{i}" for i in range(230)]
    queries = base[[3, 50, 229]] + 0.01
    chunks = [(ids[i : i + 64], base[i : i + 64]) for i in range(0, 230, 64)]
    got_ids, got_scores, scanned = exact_top_k(queries, iter(chunks), 10)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    bn = base / np.linalg.norm(base, axis=1, keepdims=True)
    sims = qn @ bn.T
    order = np.argsort(-sims, axis=1)[:, :10]
    assert scanned == 230
    assert got_ids == [[ids[j] for j in row] for row in order]
    assert np.allclose(got_scores, np.take_along_axis(sims, order, axis=1), atol=1e-6)
    few_ids, few_scores, _ = exact_top_k(queries, iter([(ids[:3], base[:3])]), 5)
    assert all(len(r) == 3 for r in few_ids) and np.isinf(few_scores[:, 3:]).all()


def test_ann_recall_counts_overlap_and_ties() -> None:
    """Recall@k is the share of the exact top k returned; a tie with the k-th score counts."""
    exact_ids = [["a", "b", "c"], ["x", "y", "z"]]
    exact_scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.5, 0.5]])
    ann = [[("a", 0.9), ("c", 0.7), ("q", 0.1)], [("x", 0.9), ("z", 0.5), ("w", 0.5)]]
    assert ann_recall(ann, exact_ids, exact_scores, 3) == pytest.approx((2 / 3 + 1.0) / 2)


def _evaluation(model_id: str, r1: float, ci: tuple[float, float]) -> ModelEvaluation:
    return ModelEvaluation(
        model_id=model_id, spec=model_id.split("@")[0], source="version", status=None, recall_at_1=r1,
        recall_at_1_ci=ci, recall_at_5=0.9, mean_ap=0.5, silhouette=0.1, vectors_from_index=10, vectors_encoded=0,
        images_per_second=100.0, images_timed=10, batch_size=8, device="cpu", parameters=1, weights_bytes=4,
        peak_memory_bytes=None, peak_memory_method="unavailable", dim=8, index_bytes_per_million=32_000_000,
    )  # fmt: skip


def _sample(key: str) -> SampleInfo:
    return SampleInfo(seed=0, requested=10, images=10, skus=5, queries=10, max_per_sku=10, key=key, bootstrap_resamples=1000)


def test_cutover_check_compares_kept_evaluations_on_one_sample(tmp_path: Path) -> None:
    """Nothing kept: no text; both on one sample: a table, worse only below the serving interval;
    different samples: a hint to evaluate both."""
    settings = SimpleNamespace(home=tmp_path)
    ledger = SimpleNamespace(version=lambda model_id: None)
    assert cutover_check(settings, ledger, "cur@x#1", "tgt@y#2") == (None, False)
    assert cutover_check(settings, ledger, None, "tgt@y#2") == (None, False)
    save_evaluation(tmp_path, _sample("k1"), _evaluation("cur@x#1", 0.8, (0.7, 0.9)))
    text, worse = cutover_check(settings, ledger, "cur@x#1", "tgt@y#2")
    assert not worse and "imgsync evaluate --model cur@x#1 --model tgt@y#2" in text
    save_evaluation(tmp_path, _sample("k1"), _evaluation("tgt@y#2", 0.72, (0.6, 0.8)))
    text, worse = cutover_check(settings, ledger, "cur@x#1", "tgt@y#2")
    assert not worse and "0.720" in text and "0.800 [0.700, 0.900]" in text
    save_evaluation(tmp_path, _sample("k1"), _evaluation("tgt@y#2", 0.65, (0.55, 0.75)))  # same sample: replaced
    text, worse = cutover_check(settings, ledger, "cur@x#1", "tgt@y#2")
    assert worse and "worse on Recall@1" in text


def test_random_control_is_deterministic_and_blind() -> None:
    """random:DIM gives unit vectors seeded by the pixels: equal pixels equal vectors, else unrelated."""
    from worker.encoders import create_encoder

    enc = create_encoder("random:32")
    a = np.zeros((32, 32, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    v = enc.encode([a, b, a.copy()])
    assert v.shape == (3, 32) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(v[0], v[2]) and abs(float(v[0] @ v[1])) < 0.9
    assert np.array_equal(create_encoder("random:32").encode([a])[0], v[0])  # another instance, same vector
    import torch  # pixels decoded on the device arrive as 3×H×W tensors: the same pixels, the same vector

    assert np.array_equal(enc.encode([torch.from_numpy(b).permute(2, 0, 1)])[0], v[1])
    assert enc.model_id.startswith("random:32@pixels-sha256#")
    for bad in ("random:x", "random:1", "random:16@w"):
        with pytest.raises(ConfigError, match="IMGSYNC_MODEL"):
            create_encoder(bad).load()


def test_models_resolve_to_versions_or_specs() -> None:
    """No --model: every active version, serving first; a version by id, spec or prefix; else a spec;
    neither: a ConfigError naming the known versions and the backends."""
    from datetime import UTC, datetime

    from worker.cli.evaluate import resolve_models
    from worker.ledger import VersionRow

    now = datetime.now(UTC)
    serving = VersionRow("tiny:imgsync-tiny@random-seed0#aa", "tiny", "serving", "ci", "cs", 64, now, now)
    building = VersionRow("random:32@pixels-sha256#bb", "random:32", "building", "ri", "rs", 32, now, None)

    class FakeLedger:
        def versions(self, statuses=("serving", "standby", "building")):  # type: ignore[no-untyped-def]
            return [v for v in (serving, building) if v.status in statuses]

    ledger = FakeLedger()
    assert [s.version for s in resolve_models(ledger, [])] == [serving, building]
    got = resolve_models(ledger, ["tiny", "random:32", "random:32@pix", "random:16", "random:16"])
    assert [(s.spec, s.version) for s in got] == [("tiny", serving), ("random:32", building), ("random:16", None)]
    with pytest.raises(ConfigError, match=r"neither a model version .*known versions: tiny:imgsync-tiny.*backends: .*random"):
        resolve_models(ledger, ["nope"])
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        resolve_models(type("Empty", (), {"versions": lambda self, statuses=(): []})(), [])
