"""End to end on the embedded default: real Celery worker processes on the SQLite broker, a real
Milvus Lite server, the ``imgsync index`` CLI as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config.settings import Settings
from schemas.events import image_id_for, normalize_uri
from schemas.outputs import IndexOutput
from tests.helpers import photo, reference_open_clip
from tests.stack import MODES, running_stack
from worker.index import IMAGES_ALIAS, SKUS_ALIAS, MilvusStore
from worker.index.milvus_store import GRPC_OPTIONS
from worker.ledger import Ledger, make_engine

pytestmark = pytest.mark.e2e

TIMEOUT = 240


@pytest.fixture(scope="module", params=MODES)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_database):
    """A Milvus Lite server and two worker processes on each broker/state combination."""
    with running_stack(tmp_path_factory.mktemp("e2e"), request.param, pg_database=pg_database) as st:
        yield st


def run_cli(stack: dict, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 30,
    )


def index_json(stack: dict, *args: str) -> tuple[int, IndexOutput]:
    proc = run_cli(stack, "index", *args, "--wait", "--json", "--timeout", str(TIMEOUT))
    assert proc.stdout.strip(), f"no JSON on stdout; stderr:\n{proc.stderr[-3000:]}"
    return proc.returncode, IndexOutput.model_validate_json(proc.stdout)


def wait_skus_clean(settings: Settings, timeout: float = 60) -> None:
    ledger = Ledger(make_engine(settings.effective_database_url))
    deadline = time.monotonic() + timeout
    while ledger.sku_counts()[1] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ledger.sku_counts()[1] == 0, "SKU refreshes did not settle"


def test_folder_indexes_end_to_end(stack: dict, catalog) -> None:
    """20 images over 5 SKUs: vectors equal open_clip's own, SKU means exact, search finds each image,
    ledger says indexed, a second process reads while workers write, and a re-run encodes nothing."""
    root = catalog(n_skus=5, per_sku=4)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 20
    store = MilvusStore(stack["uri"])

    seen_counts: list[int] = []
    reader_errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:  # a second process (this one) reads while the workers write
        from pymilvus import MilvusClient

        client = MilvusClient(uri=stack["uri"], grpc_options=GRPC_OPTIONS)
        while not stop.is_set():
            try:
                if IMAGES_ALIAS in client.list_aliases().get("aliases", []):
                    res = client.query(IMAGES_ALIAS, filter="", output_fields=["count(*)"], consistency_level="Strong")
                    seen_counts.append(int(res[0]["count(*)"]))
            except BaseException as exc:  # noqa: BLE001
                reader_errors.append(exc)
            time.sleep(0.05)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    code, out = index_json(stack, str(root))
    stop.set()
    t.join(5)

    assert code == 0, out
    assert len(out.results) == 20
    assert {r.outcome for r in out.results} == {"indexed"}
    assert {r.sku for r in out.results} == {f"SKU-{i}" for i in range(1, 6)}
    assert not reader_errors, reader_errors[:3]
    assert seen_counts and seen_counts[-1] == 20

    # each vector equals open_clip's reference encoding of the same file
    reference = reference_open_clip("imgsync-tiny")
    ids = [image_id_for(normalize_uri(str(f))) for f in files]
    rows = {r["image_id"]: r for r in store.get_images(IMAGES_ALIAS, ids)}
    assert set(rows) == set(ids)
    ref = reference([Image.open(f).convert("RGB") for f in files])
    for f, image_id, ref_vec in zip(files, ids, ref, strict=True):
        got = np.asarray(rows[image_id]["vector"], dtype=np.float32)
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5
        assert float(got @ ref_vec) >= 0.9999, f
        assert rows[image_id]["sku"] == f.parent.name

    # each SKU vector is the normalized mean of its images' vectors
    wait_skus_clean(stack["settings"])
    skus = {r["sku"]: r for r in store.get_skus(SKUS_ALIAS, [f"SKU-{i}" for i in range(1, 6)])}
    assert len(skus) == 5
    for sku, row in skus.items():
        members = [rows[i]["vector"] for f, i in zip(files, ids, strict=True) if f.parent.name == sku]
        mean = np.mean(np.asarray(members, dtype=np.float64), axis=0)
        mean /= np.linalg.norm(mean)
        np.testing.assert_allclose(np.asarray(row["vector"]), mean, atol=1e-5)
        assert row["image_count"] == 4

    # an image query returns that image first (through the CLI, JSON)
    query = files[7]
    proc = run_cli(stack, "search", "--image", str(query), "--json", "--limit", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = json.loads(proc.stdout)["hits"]
    assert hits[0]["uri"] == normalize_uri(str(query))
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

    # the ledger says indexed
    ledger = Ledger(make_engine(stack["settings"].effective_database_url))
    ledger_rows = ledger.rows(ids)
    assert {r.state for r in ledger_rows.values()} == {"indexed"}
    assert all(r.content_hash and r.model_id for r in ledger_rows.values())

    # re-indexing the same files encodes nothing
    before = {i: rows[i]["indexed_at"] for i in ids}
    code, again = index_json(stack, str(root))
    assert code == 0
    assert {r.outcome for r in again.results} == {"unchanged"}
    after = {r["image_id"]: r["indexed_at"] for r in store.get_images(IMAGES_ALIAS, ids)}
    assert after == before
    assert {i: r.state for i, r in ledger.rows(ids).items()} == {i: "indexed" for i in ids}
    # without --wait too: every image answered at once, nothing queued
    proc = run_cli(stack, "index", str(root), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    quick = IndexOutput.model_validate_json(proc.stdout)
    assert quick.queued == 0 and quick.request_id
    assert sorted(r.image_id for r in quick.results) == sorted(ids)
    assert {r.outcome for r in quick.results} == {"unchanged"}
    store.close()


def test_prune_deletes_what_is_gone_from_the_folder(stack: dict, tmp_path: Path) -> None:
    """`index FOLDER --prune`: an image the ledger holds under the folder whose file is gone is deleted
    (outcome `deleted`): its vector leaves Milvus, its SKU's vector is the mean of what is left, the
    images still there are unchanged. Without --prune nothing is deleted; a SKU folder removed entirely
    or a file removed and given itself are pruned too; images elsewhere are not touched."""
    root = tmp_path / "prune" / "cat"  # SKUs of its own: the stack is shared with the other tests
    for s in (1, 2):
        (root / f"PRUNE-{s}").mkdir(parents=True)
        for i in (1, 2):
            photo(160 + 40 * i, 120, seed=500 + 10 * s + i).save(root / f"PRUNE-{s}" / f"{i}.jpg")
    elsewhere = tmp_path / "prune" / "cat-2"  # a sibling whose name extends root's
    (elsewhere / "OTHER").mkdir(parents=True)
    photo(200, 150, seed=99).save(elsewhere / "OTHER" / "1.jpg")
    code, out = index_json(stack, str(root), str(elsewhere))
    assert code == 0 and {r.outcome for r in out.results} == {"indexed"}, out
    files = sorted(root.rglob("*.jpg"))
    ids = {f: image_id_for(normalize_uri(str(f))) for f in files}
    gone = root / "PRUNE-1" / "1.jpg"
    gone.unlink()

    code, out = index_json(stack, str(root))
    assert code == 0 and sorted(r.outcome for r in out.results) == ["unchanged"] * 3  # no --prune: kept

    code, out = index_json(stack, str(root), "--prune")
    assert code == 0, out
    outcomes = {r.image_id: r.outcome for r in out.results}
    assert outcomes == {i: ("deleted" if f == gone else "unchanged") for f, i in ids.items()}
    store = MilvusStore(stack["uri"])
    held = {r["image_id"]: r for r in store.get_images(IMAGES_ALIAS, list(ids.values()))}
    assert set(held) == {i for f, i in ids.items() if f != gone}
    ledger = Ledger(make_engine(stack["settings"].effective_database_url))
    assert ledger.get(ids[gone]).state == "deleted"  # type: ignore[union-attr]
    wait_skus_clean(stack["settings"])
    left = held[ids[root / "PRUNE-1" / "2.jpg"]]["vector"]
    sku = store.get_skus(SKUS_ALIAS, ["PRUNE-1"])[0]
    np.testing.assert_allclose(np.asarray(sku["vector"]), np.asarray(left), atol=1e-5)
    assert sku["image_count"] == 1

    # a SKU folder removed, given itself; a file removed, given itself
    shutil.rmtree(root / "PRUNE-2")
    (root / "PRUNE-1" / "2.jpg").unlink()
    code, out = index_json(stack, str(root / "PRUNE-2"), str(root / "PRUNE-1" / "2.jpg"), "--prune")
    assert code == 0, out
    assert sorted((Path(r.uri).parent.name, Path(r.uri).name, r.outcome) for r in out.results) == [
        ("PRUNE-1", "2.jpg", "deleted"), ("PRUNE-2", "1.jpg", "deleted"), ("PRUNE-2", "2.jpg", "deleted"),
    ]  # fmt: skip
    assert store.get_images(IMAGES_ALIAS, list(ids.values())) == []
    # a folder emptied entirely, given itself: its images were pruned already, nothing is left to do
    # (a sync run again, e.g. from cron: exit 0, not the usage error of a folder with no images)
    for f in files:
        f.unlink(missing_ok=True)
    proc = run_cli(stack, "index", str(root), "--prune", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"results": [], "request_id": None, "queued": 0}, proc.stdout
    proc = run_cli(stack, "index", str(root), "--json")
    assert proc.returncode == 2 and "no images found" in json.loads(proc.stdout)["error"]["message"]
    assert store.get_images(IMAGES_ALIAS, list(ids.values())) == []
    other = image_id_for(normalize_uri(str(next(elsewhere.rglob("*.jpg")))))
    assert [r["image_id"] for r in store.get_images(IMAGES_ALIAS, [other])] == [other]
    proc = run_cli(stack, "index", "s3://bucket/SKU-1/a.jpg", "--prune", "--json")
    assert proc.returncode == 2 and "--prune" in json.loads(proc.stdout)["error"]["message"]
    store.close()


def test_bad_file_is_failed_with_reason_and_batch_mates_indexed(stack: dict, tmp_path: Path, catalog) -> None:
    """An HTML page saved as .jpg and a truncated JPEG fail with their reason codes; the good images in
    the same run are indexed; exit status 1."""
    root = catalog(n_skus=1, per_sku=3, root=tmp_path / "mixed")
    bad_html = root / "SKU-1" / "error-page.jpg"
    bad_html.write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    good = root / "SKU-1" / "1.jpg"
    truncated = root / "SKU-1" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:600])
    code, out = index_json(stack, str(root), "--sku", "MIXED-1")
    by_name = {Path(r.uri).name: r for r in out.results}
    assert code == 1
    assert by_name["error-page.jpg"].outcome == "failed"
    assert by_name["error-page.jpg"].reason == "unsupported_format"
    assert by_name["truncated.jpg"].outcome == "failed"
    assert by_name["truncated.jpg"].reason in ("truncated", "corrupt")
    assert [by_name[f"{i}.jpg"].outcome for i in (1, 2, 3)] == ["indexed"] * 3
    ledger = Ledger(make_engine(stack["settings"].effective_database_url))
    row = ledger.get(by_name["error-page.jpg"].image_id)
    assert row is not None and row.state == "failed" and row.reason == "unsupported_format"


def test_batch_of_64_with_5_bad_files_then_replay(stack: dict, tmp_path: Path, catalog) -> None:
    """64 images with 5 bad ones: the 59 good are indexed, the 5 are listed by `imgsync failures` with
    their reasons; after one file is fixed, `failures replay` indexes it."""
    from tests.helpers import photo

    root = catalog(n_skus=1, per_sku=59, root=tmp_path / "big")
    bad_dir = root / "SKU-1"
    (bad_dir / "empty.jpg").write_bytes(b"")
    (bad_dir / "page.jpg").write_bytes(b"<html><body>oops</body></html>")
    (bad_dir / "tiny.png").write_bytes(_png(photo(3, 3, seed=1)))
    good = (bad_dir / "1.jpg").read_bytes()
    (bad_dir / "cut.jpg").write_bytes(good[: len(good) // 2])
    (bad_dir / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    code, out = index_json(stack, str(root), "--sku", "BIG-1")
    assert code == 1 and len(out.results) == 64
    outcomes = {Path(r.uri).name: (r.outcome, r.reason) for r in out.results}
    assert sum(o == "indexed" for o, _ in outcomes.values()) == 59
    expected = {
        "empty.jpg": "corrupt",
        "page.jpg": "unsupported_format",
        "tiny.png": "too_small",
        "cut.jpg": "truncated",
        "eps.png": "unsupported_format",
    }
    assert {k: outcomes[k] for k in expected} == {k: ("failed", v) for k, v in expected.items()}

    proc = run_cli(stack, "failures", "list", "--sku", "BIG-1", "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    listed = json.loads(proc.stdout)
    assert {Path(f["uri"]).name: f["reason"] for f in listed["failures"]} == expected

    (bad_dir / "cut.jpg").write_bytes(good)  # the file is fixed upstream
    proc = run_cli(
        stack, "failures", "replay", "--reason", "truncated", "--sku", "BIG-1", "--wait", "--json", "--timeout", "120"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    replayed = json.loads(proc.stdout)["results"]
    assert [(Path(r["uri"]).name, r["outcome"]) for r in replayed] == [("cut.jpg", "indexed")]
    proc = run_cli(stack, "failures", "list", "--sku", "BIG-1", "--json")
    assert "cut.jpg" not in proc.stdout and len(json.loads(proc.stdout)["failures"]) == 4


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_verify_finds_each_drift_and_repair_fixes_exactly_those(stack: dict, tmp_path: Path, catalog) -> None:
    """Injected drift — a vector deleted in Milvus, an orphan vector, a tampered SKU vector, a stale
    ledger hash — is reported by `verify --json` (exit 1); `verify --repair` fixes it and a later
    verify is clean."""
    import sqlalchemy as sa

    from worker.index import ImageEntity
    from worker.ledger.tables import images

    root = catalog(n_skus=2, per_sku=3, root=tmp_path / "v")
    code, out = index_json(stack, str(root), "--sku", "VERIFY-X")
    assert code == 0
    code, moved = index_json(stack, str(root / "SKU-1"), "--sku", "VERIFY-Y")  # 3 images change SKU
    assert code == 0 and {r.outcome for r in moved.results} == {"indexed"}
    ids = [r.image_id for r in out.results]
    wait_skus_clean(stack["settings"])
    proc = run_cli(stack, "verify", "--json")
    baseline = json.loads(proc.stdout)
    store = MilvusStore(stack["uri"])
    coll = store.serving_collection()
    assert coll
    ledger = Ledger(make_engine(stack["settings"].effective_database_url))

    store.delete_images(coll, [ids[0]])  # missing
    vec = np.zeros(store.image_vectors(coll, [ids[1]])[ids[1]].shape, np.float32)
    vec[0] = 1.0
    names = type("N", (), {"images": coll, "skus": store.alias_targets()["imgsync_skus"], "model_id": "x"})()
    store.upsert_images(names, [ImageEntity("f" * 32, "VERIFY-X", "file:///nowhere.jpg", vec, "h", "x", 1)])  # orphan
    store.upsert_sku(names, "VERIFY-X", vec, 6)  # tampered SKU vector
    with ledger.engine.begin() as conn:  # stale provenance
        conn.execute(sa.update(images).where(images.c.image_id == ids[2]).values(content_hash="0" * 64))

    proc = run_cli(stack, "verify", "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    found = json.loads(proc.stdout)
    assert set(found["missing"]) - set(baseline["missing"]) == {ids[0]}
    assert set(found["orphans"]) - set(baseline["orphans"]) == {"f" * 32}
    assert set(found["stale"]) - set(baseline["stale"]) == {ids[2]}
    assert "VERIFY-X" in found["sku_mismatch"]

    proc = run_cli(stack, "verify", "--repair", "--json")
    repaired = json.loads(proc.stdout)["repaired"]
    assert repaired["orphans_deleted"] >= 1 and repaired["reencode"] >= 2 and repaired["skus_refreshed"] >= 1
    deadline = time.monotonic() + 90
    while True:
        after = json.loads(run_cli(stack, "verify", "--json").stdout)
        if after["problems"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert after["problems"] == 0, after
    store.close()


def test_reindex_scopes_dry_run_and_unchanged(stack: dict, tmp_path: Path, catalog) -> None:
    """reindex: --dry-run counts the scope and changes nothing; a real run of unchanged images costs no
    forward pass (outcome unchanged, Milvus untouched); --prefix selects by path; bad usage is exit 2."""
    root = catalog(n_skus=2, per_sku=3, root=tmp_path / "r")
    code, out = index_json(stack, str(root), "--sku", "REIDX-1")
    assert code == 0
    ids = [r.image_id for r in out.results]
    ledger = Ledger(make_engine(stack["settings"].effective_database_url))
    before = {i: (r.updated_at, r.version) for i, r in ledger.rows(ids).items()}

    proc = run_cli(stack, "reindex", "--sku", "REIDX-1", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert (plan["images"], plan["skus"], plan["dry_run"]) == (6, 1, True)
    assert {i: (r.updated_at, r.version) for i, r in ledger.rows(ids).items()} == before

    store = MilvusStore(stack["uri"])
    stamps = {r["image_id"]: r["indexed_at"] for r in store.get_images(IMAGES_ALIAS, ids)}
    proc = run_cli(stack, "reindex", "--sku", "REIDX-1", "--json", "--timeout", "120")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {r["outcome"] for r in json.loads(proc.stdout)["results"]} == {"unchanged"}
    assert {r["image_id"]: r["indexed_at"] for r in store.get_images(IMAGES_ALIAS, ids)} == stamps
    store.close()

    proc = run_cli(stack, "reindex", "--prefix", str(root / "SKU-2"), "--dry-run", "--json")
    assert json.loads(proc.stdout)["images"] == 3
    assert run_cli(stack, "reindex", "--dry-run").returncode == 2
    assert run_cli(stack, "reindex", "--failed", "--model", "timm:resnet10t").returncode == 2  # usage error


def test_pickle_refused_and_malformed_payloads_dead_lettered(stack: dict, tmp_path: Path, catalog) -> None:
    """A message serialized with pickle is never executed; malformed JSON payloads are dead-lettered
    with reason invalid_event; the workers keep going and index the next images."""
    from schemas.events import ImageEvent
    from schemas.tasks import PreprocessPayload
    from worker.celery_app import configure
    from worker.dispatch import TASK_PREPROCESS

    settings = stack["settings"]
    app = configure(settings)
    queue = settings.queues.preprocess
    pickled = tmp_path / "pickled" / "p.jpg"
    pickled.parent.mkdir()
    (catalog(n_skus=1, per_sku=1, root=tmp_path / "src") / "SKU-1" / "1.jpg").rename(pickled)
    good = PreprocessPayload(event=ImageEvent(uri=str(pickled), sku="PICKLE")).model_dump(mode="json")
    ledger = Ledger(make_engine(settings.effective_database_url))
    before = ledger.dead_letter_count()
    app.send_task(TASK_PREPROCESS, args=[good], queue=queue, serializer="pickle")
    app.send_task(TASK_PREPROCESS, args=[{"event": {"uri": 12, "sku": ""}}], queue=queue)
    app.send_task(TASK_PREPROCESS, args=["not a payload", 5], queue=queue)

    root = catalog(n_skus=1, per_sku=2, root=tmp_path / "after")
    code, out = index_json(stack, str(root), "--sku", "AFTER-POISON")
    assert code == 0 and {r.outcome for r in out.results} == {"indexed"}  # the workers are alive

    deadline = time.monotonic() + 30
    while ledger.dead_letter_count() < before + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    rows = [r for r in ledger.dead_letter_rows() if r["task"] == TASK_PREPROCESS]
    assert before + 2 <= ledger.dead_letter_count()
    assert {r["reason"] for r in rows} == {"invalid_event"}
    assert any("not a payload" in r["body"] for r in rows)
    assert ledger.get(ImageEvent(uri=str(pickled), sku="PICKLE").image_id) is None  # pickle never ran
    status = json.loads(run_cli(stack, "status", "--json").stdout)
    assert status["dead_letters"] >= 2
