"""``imgsync evaluate`` on a running stack: a real architecture with random weights (``tiny``) beats
the random control on a catalog of products photographed under different crops, rotations, colour
jitter and backgrounds; the JSON validates against its schema; ``cutover`` to the control shows the
comparison and is refused without ``--force``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from schemas.evaluation import EvaluationOutput
from tests.stack import Stack, running_stack
from worker.ledger import Ledger, make_engine

pytestmark = pytest.mark.e2e

CONTROL = "random:32"
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "bar")


def _product(sku: int, side: int = 160) -> Image.Image:
    """SKU ``sku``'s object: its own shape, filled with its own two-colour stripes (RGBA)."""
    rng = np.random.default_rng(7919 * (sku + 1))
    c1, c2 = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    fill = Image.new("RGB", (side, side), c1)
    d = ImageDraw.Draw(fill)
    stripe = int(rng.integers(8, 28))
    for x in range(-side, 2 * side, 2 * stripe):
        d.polygon([(x, 0), (x + stripe, 0), (x + stripe + side // 2, side), (x + side // 2, side)], fill=c2)
    mask = Image.new("L", (side, side), 0)
    m, s, h = ImageDraw.Draw(mask), side, side // 2
    match SHAPES[sku % len(SHAPES)]:
        case "circle":
            m.ellipse([8, 8, s - 8, s - 8], fill=255)
        case "square":
            m.rectangle([20, 20, s - 20, s - 20], fill=255)
        case "triangle":
            m.polygon([(h, 6), (s - 6, s - 12), (6, s - 12)], fill=255)
        case "star":
            radius = [(h - 6) * (1 if k % 2 == 0 else 0.45) for k in range(10)]
            angle = [math.pi * k / 5 - math.pi / 2 for k in range(10)]
            m.polygon([(h + r * math.cos(a), h + r * math.sin(a)) for r, a in zip(radius, angle, strict=True)], fill=255)
        case "ring":
            m.ellipse([6, 6, s - 6, s - 6], fill=255)
            m.ellipse([s // 3, s // 3, s - s // 3, s - s // 3], fill=0)
        case "cross":
            m.rectangle([s // 3, 6, s - s // 3, s - 6], fill=255)
            m.rectangle([6, s // 3, s - 6, s - s // 3], fill=255)
        case "diamond":
            m.polygon([(h, 4), (s - 4, h), (h, s - 4), (4, h)], fill=255)
        case _:
            m.rectangle([10, h - 22, s - 10, h + 22], fill=255)
    out = fill.convert("RGBA")
    out.putalpha(mask)
    return out


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A light backdrop: plain, a gradient, or noise."""
    c = rng.integers(170, 256, 3).astype(float)
    match int(rng.integers(0, 3)):
        case 0:
            arr = np.broadcast_to(c, (h, w, 3))
        case 1:
            t = np.linspace(0, 1, w)[None, :, None]
            arr = np.broadcast_to(c * (1 - t) + rng.integers(170, 256, 3) * t, (h, w, 3))
        case _:
            arr = np.clip(c + rng.normal(0, 12, (h, w, 3)), 0, 255)
    return Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8), "RGB")


def _shot(sku: int, view: int, side: int = 224) -> Image.Image:
    """One photo of SKU ``sku``: rotated, scaled, placed on a backdrop, colour-jittered, cropped."""
    rng = np.random.default_rng(100_003 * (sku + 1) + view)
    img = _background(rng, side, side)
    obj = _product(sku).rotate(float(rng.uniform(-30, 30)), expand=True, resample=Image.Resampling.BICUBIC)
    scale = float(rng.uniform(0.85, 1.0)) * side / max(obj.size)
    obj = obj.resize((max(1, int(obj.width * scale)), max(1, int(obj.height * scale))), Image.Resampling.BICUBIC)
    img.paste(obj, (int(rng.integers(0, side - obj.width + 1)), int(rng.integers(0, side - obj.height + 1))), obj)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.85, 1.15)))
    cw, ch = (int(side * rng.uniform(0.85, 1.0)) for _ in range(2))
    x0, y0 = int(rng.integers(0, side - cw + 1)), int(rng.integers(0, side - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def write_catalog(root: Path, skus: int, views: int) -> Path:
    """``<root>/SKU-nn/<view>.jpg``: ``views`` photos of each of ``skus`` distinct products."""
    for s in range(skus):
        for v in range(views):
            path = root / f"SKU-{s:02d}" / f"{v}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            _shot(s, v).save(path, quality=90)
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A running stack that indexed 12 SKUs × 4 photos (``<tmp>/catalog``) with ``tiny``."""
    tmp = tmp_path_factory.mktemp("evaluate")
    root = write_catalog(tmp / "catalog", skus=12, views=4)
    with running_stack(tmp / "stack") as st:
        indexed = st.cli("index", str(root), "--wait", "--json", "--timeout", "240")
        assert indexed.returncode == 0, indexed.stderr[-2000:]
        yield st


def test_bad_model_and_too_small_sample_are_usage_errors(stack: Stack) -> None:
    """An unknown model, or a sample with room for fewer than two SKUs of two images: one line, exit 2."""
    unknown = stack.cli("evaluate", "--model", "nope-model", "--no-ann")
    assert unknown.returncode == 2, unknown.stderr[-2000:]
    message = " ".join(unknown.stderr.split())  # rich wraps long lines at the terminal width
    assert message.startswith("error: --model 'nope-model' is neither a model version") and "backends:" in message
    assert "Traceback" not in unknown.stderr
    # the smallest sample spans two SKUs (it was refused: the first SKU's 4 photos took every place)
    small = stack.cli("evaluate", "--sample", "4", "--model", "random:8", "--no-ann", "--json")
    assert small.returncode == 0, small.stderr[-2000:]
    drawn = json.loads(small.stdout)["sample"]
    assert (drawn["images"], drawn["skus"], drawn["max_per_sku"]) == (4, 2, 2)


def test_real_model_beats_the_random_control_and_cutover_warns(stack: Stack) -> None:
    """tiny (random weights) scores above random:32 on Recall@1 and mAP, exact search, same sample;
    the JSON validates; the index loses nothing against exact search; a cutover to the control shows
    both and is refused (exit 1) without --force, done with it."""
    st = stack
    built = st.cli("reindex", "--all", "--model", CONTROL, "--json", "--timeout", "240")
    assert built.returncode == 0, built.stderr[-2000:]
    control_id = json.loads(built.stdout)["model_id"]

    ev = st.cli("evaluate", "--model", "tiny", "--model", CONTROL, "--model", "random:16", "--sample", "40", "--seed", "3", "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    doc = EvaluationOutput.model_validate_json(ev.stdout)  # the whole stdout is the one document
    real, control, spec_only = doc.models
    assert (real.status, control.status, spec_only.source) == ("serving", "building", "spec")
    assert control.model_id == control_id and (real.dim, control.dim, spec_only.dim) == (64, 32, 16)
    assert doc.sample.images == doc.sample.queries == 40 and doc.sample.skus == 10 and doc.sample.left_out == 0
    assert (real.vectors_from_index, real.vectors_encoded, spec_only.vectors_encoded) == (40, 0, 40)
    assert real.recall_at_1 > control.recall_at_1 and real.mean_ap > control.mean_ap
    assert real.recall_at_1 > spec_only.recall_at_1 and real.mean_ap > spec_only.mean_ap
    assert real.recall_at_1_ci[0] <= real.recall_at_1 <= real.recall_at_1_ci[1]
    assert real.images_per_second and real.parameters > 0 and real.index_bytes_per_million == 64 * 4 * 10**6
    assert doc.ann is not None and doc.ann.vectors_scanned == 48 and doc.ann.recall_at_k >= 0.9

    refused = st.cli("cutover", control_id)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "worse on Recall@1" in refused.stdout and "refused" in refused.stderr
    ledger = Ledger(make_engine(st.settings.effective_database_url))
    assert ledger.serving_version().model_id == real.model_id  # nothing moved

    forced = st.cli("cutover", control_id, "--force", "--json")
    assert forced.returncode == 0, forced.stderr[-2000:]
    cut = json.loads(forced.stdout)
    assert cut["changed"] and cut["worse_recall_at_1"] is True and "warning" in forced.stderr
    assert ledger.serving_version().model_id == control_id
    ledger.engine.dispose()


def test_people_get_a_table_and_unreadable_images_are_left_out(stack: Stack) -> None:
    """Without --json: one rich table, a column per model, the metrics as rows. An image that can no
    longer be read is left out of every model's sample, with a note (runs last: it deletes a file)."""
    (stack.logs.parent.parent / "catalog" / "SKU-00" / "0.jpg").unlink()
    shown = stack.cli("evaluate", "--model", "random:8", "--model", "random:16", "--sample", "48", "--no-ann")
    assert shown.returncode == 0, shown.stderr[-2000:]
    for text in ("random:8", "random:16", "47 images, 12 SKUs", "Recall@1 [95% CI]", "mAP", "silhouette", "vector dim"):
        assert text in shown.stdout
    assert "1 sampled image(s) could not be read now and were left out (reasons: not_found)" in " ".join(shown.stderr.split())
