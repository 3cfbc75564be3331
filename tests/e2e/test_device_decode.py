"""IMGSYNC_JPEG_DECODE=encoder end to end in production shape: real Celery worker processes on
Redis (broker and pixel store) and PostgreSQL, ``imgsync index --wait`` as a user runs it.

The encode worker runs on the CPU here (no GPU on this machine), so ``torchvision.io.decode_jpeg``
uses libjpeg-turbo where a GPU worker uses nvJPEG; the handoff, batching, fallback and recording are
the same code.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schemas.events import image_id_for, normalize_uri
from schemas.outputs import IndexOutput
from tests.helpers import photo, reference_open_clip
from tests.stack import running_stack
from worker.index import IMAGES_ALIAS, MilvusStore

pytestmark = pytest.mark.e2e


def _catalog(root: Path) -> tuple[list[Path], Path, Path]:
    """JPEGs (one EXIF-rotated, one grayscale, one progressive), a PNG, a truncated JPEG and one
    with a garbage scan."""
    good: list[Path] = []
    for i in range(8):
        path = root / f"SKU-{i % 3}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = photo(320 + 40 * i, 240 + 16 * i, seed=i)
        params: dict[str, object] = {"quality": 90}
        if i == 1:
            exif = Image.Exif()
            exif[0x0112] = 6
            params["exif"] = exif.tobytes()
        if i == 2:
            img = img.convert("L")
        if i == 3:
            params["progressive"] = True
        img.save(path, "JPEG", **params)
        good.append(path)
    png = root / "SKU-0" / "p.png"
    photo(200, 150, seed=50).save(png)
    good.append(png)
    buf = io.BytesIO()
    photo(300, 200, seed=60).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    truncated = root / "SKU-1" / "cut.jpg"
    truncated.write_bytes(data[:-400])
    sos = data.find(b"\xff\xda")
    broken = root / "SKU-2" / "broken.jpg"
    broken.write_bytes(data[: sos + 20] + np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes() + b"\xff\xd9")
    return good, truncated, broken


def test_encoder_side_jpeg_decode_indexes_a_catalog(tmp_path: Path, pg_database) -> None:
    """Every good image is indexed with open_clip's own vector (cos ≥ 0.999), the truncated file is
    failed ``truncated`` by preprocess, the broken scan ``corrupt`` after the device refused it, and
    a second run encodes nothing."""
    good, truncated, broken = _catalog(tmp_path / "catalog")
    env = {"IMGSYNC_JPEG_DECODE": "encoder", "IMGSYNC_BATCH_MAX": "16"}
    with running_stack(tmp_path / "stack", "production", pg_database=pg_database, extra_env=env) as st:
        proc = st.cli("index", str(tmp_path / "catalog"), "--wait", "--json", "--timeout", "240")
        out = IndexOutput.model_validate_json(proc.stdout)
        assert proc.returncode == 1, proc.stderr[-2000:]  # ran, with failures
        by_uri = {r.uri: r for r in out.results}
        for f in good:
            assert by_uri[normalize_uri(str(f))].outcome == "indexed", f
        assert (by_uri[normalize_uri(str(truncated))].outcome, by_uri[normalize_uri(str(truncated))].reason) == ("failed", "truncated")
        assert (by_uri[normalize_uri(str(broken))].outcome, by_uri[normalize_uri(str(broken))].reason) == ("failed", "corrupt")

        store = MilvusStore(st.uri)
        ids = [image_id_for(normalize_uri(str(f))) for f in good]
        rows = {r["image_id"]: r for r in store.get_images(IMAGES_ALIAS, ids)}
        assert set(rows) == set(ids)
        reference = reference_open_clip("imgsync-tiny")
        from PIL import ImageOps

        ref = reference([ImageOps.exif_transpose(Image.open(f)).convert("RGB") for f in good])
        for f, image_id, want in zip(good, ids, ref, strict=True):
            got = np.asarray(rows[image_id]["vector"], dtype=np.float32)
            assert float(got @ want) >= 0.999, f
        log = (st.logs / "encode.log").read_text()
        assert "broken.jpg failed" in log and "decoding it on the CPU" in log  # the device refused it first
        assert "IMGSYNC_JPEG_DECODE=encoder on a cpu encode worker" in log  # said at start

        again = st.cli("index", str(tmp_path / "catalog"), "--wait", "--json", "--timeout", "240")
        outcomes = {r.uri: r.outcome for r in IndexOutput.model_validate_json(again.stdout).results}
        assert all(outcomes[normalize_uri(str(f))] == "unchanged" for f in good)
