"""The folder source: what a rescan publishes (files and what the ledger holds but is gone), the
watcher (debounce, moves, deletes, folders, overflow), and end to end on the embedded stack."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas.events import Action, ImageEvent, image_id_for, normalize_uri
from tests.helpers import photo
from worker.ledger import Ledger, make_engine, upgrade
from worker.sources.folder import FolderSource


class Recorder:
    """A publish function that keeps the events."""

    def __init__(self) -> None:
        self.events: list[ImageEvent] = []
        self.lock = threading.Lock()

    def __call__(self, settings, events) -> str:
        with self.lock:
            self.events.extend(events)
        return "test"

    def take(self) -> list[ImageEvent]:
        with self.lock:
            out, self.events = self.events, []
        return out

    def wait(self, n: int, timeout: float = 10.0) -> list[ImageEvent]:
        """The events published once ``n`` have arrived and things stayed quiet for a moment."""
        deadline = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(FolderSource.SETTLE_SECONDS + 0.3)  # nothing more should come
        return self.take()


def save(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(64, 48, seed=seed).save(path, format="JPEG")
    return path


def summary(events: list[ImageEvent]) -> list[tuple[str, str, str]]:
    return sorted((str(e.action), Path(e.uri.removeprefix("file://")).name, e.sku) for e in events)


@pytest.fixture
def ledger(make_settings) -> Ledger:
    settings = make_settings()
    upgrade(settings.effective_database_url)
    return Ledger(make_engine(settings.effective_database_url))


@pytest.fixture
def watching(make_settings, ledger, tmp_path: Path):
    """A FolderSource running in a thread on an empty root; yields (root, recorder)."""
    root = tmp_path / "watched"
    root.mkdir()
    rec, stop = Recorder(), threading.Event()
    source = FolderSource(make_settings(), root, publish=rec)
    t = threading.Thread(target=source.run, args=(stop,))
    t.start()
    time.sleep(0.5)  # observer started, first rescan done
    yield root, rec, source
    stop.set()
    t.join(10)
    assert not t.is_alive(), "run() did not return after stop"


def test_rescan_publishes_images_and_ignores_the_rest(make_settings, ledger, tmp_path: Path) -> None:
    """Image files under <sku>/ (any depth) become upserts versioned by the file's change time;
    hidden, temporary, non-image and root-level files are ignored."""
    root = tmp_path / "root"
    a = save(root / "SKU-1" / "a.jpg")
    d = save(root / "SKU-2" / "sub" / "d.JPEG", seed=1)
    for junk in ("SKU-1/.hidden.jpg", "SKU-1/b.jpg.part", "SKU-1/c.jpg~", "SKU-1/e.tmp", ".trash/SKU-1/f.jpg", "loose.jpg"):
        save(root / junk)
    (root / "SKU-1" / "notes.txt").write_text("not an image")
    rec = Recorder()
    stats = FolderSource(make_settings(), root, publish=rec).rescan()
    events = rec.take()
    assert (stats.upserts, stats.deletes) == (2, 0)
    assert summary(events) == [("upsert", "a.jpg", "SKU-1"), ("upsert", "d.JPEG", "SKU-2")]
    by_name = {Path(e.uri).name: e for e in events}
    for path in (a, d):
        st = path.stat()
        assert int(by_name[path.name].version) == max(st.st_mtime_ns, st.st_ctime_ns)
        assert by_name[path.name].source == "folder"


def test_rescan_deletes_what_is_gone(make_settings, ledger, tmp_path: Path) -> None:
    """Images the ledger holds under the root whose file is gone become deletes (with the ledger's
    SKU); a sibling folder sharing the root's name prefix, and deleted rows, are left alone."""
    root = tmp_path / "root"
    save(root / "SKU-1" / "kept.jpg")
    for path, sku in ((root / "SKU-1" / "gone.jpg", "SKU-1"), (tmp_path / "root2" / "S" / "x.jpg", "S"),
                      (root / "SKU-9" / "dead.jpg", "SKU-9")):
        ledger.accept(ImageEvent(uri=str(path), sku=sku, version=1))
    dead = ImageEvent(uri=str(root / "SKU-9" / "dead.jpg"), sku="SKU-9", action=Action.delete, version=2)
    ledger.accept(dead)
    ledger.mark_deleted(dead.image_id, dead.version)  # as the pipeline records a delete
    rec = Recorder()
    before = time.time_ns()
    stats = FolderSource(make_settings(), root, publish=rec).rescan()
    events = rec.take()
    assert (stats.upserts, stats.deletes) == (1, 1)
    assert summary(events) == [("delete", "gone.jpg", "SKU-1"), ("upsert", "kept.jpg", "SKU-1")]
    gone = next(e for e in events if e.action == Action.delete)
    assert int(gone.version) >= before


def test_a_file_name_that_is_not_utf8_is_indexed_and_kept(make_settings, ledger, tmp_path: Path) -> None:
    """A file whose name is not UTF-8 is published under a uri that keeps its bytes; the next rescan
    finds that file again instead of deleting the image as gone."""
    root = tmp_path / "root"
    save(root / "SKU-1" / os.fsdecode(b"caf\xe9.jpg"))
    source = FolderSource(make_settings(), root, publish=(rec := Recorder()))
    assert source.rescan().upserts == 1
    (event,) = rec.take()
    assert event.uri.endswith("/SKU-1/caf%E9.jpg") and event.sku == "SKU-1"
    ledger.accept(event)
    stats = source.rescan()
    assert stats.deletes == 0 and all(e.action == Action.upsert for e in rec.take())


def test_a_sku_folder_that_names_no_sku_is_skipped_not_retried(make_settings, ledger, tmp_path: Path) -> None:
    """A SKU folder whose name is no valid SKU (bytes that are not UTF-8, a control character) made
    the rescan raise, and the source retried it forever, publishing nothing. Now its images are
    skipped with one warning each and counted invalid; the other folders are published."""
    from worker.metrics.sources import source_metrics

    root = tmp_path / "root"
    save(root / "SKU-1" / "a.jpg")
    for name in (os.fsdecode(b"SK\xe9"), "tab\there"):
        save(root / name / "b.jpg")
    invalid = source_metrics().events.labels("folder", "invalid")
    before = invalid._value.get()
    source = FolderSource(make_settings(), root, publish=(rec := Recorder()))
    assert source.rescan().upserts == 1
    assert summary(rec.take()) == [("upsert", "a.jpg", "SKU-1")]
    source.rescan()
    assert invalid._value.get() - before == 2  # once per path, not once per rescan


def test_file_restored_with_an_old_mtime_beats_its_delete(make_settings, tmp_path: Path) -> None:
    """A file moved back in with an old mtime (backup, `mv`) still gets a version newer than the
    delete published when it went away (the ctime counts)."""
    root = tmp_path / "root"
    source = FolderSource(make_settings(), root, publish=Recorder())
    delete = source.delete_for(str(root / "SKU-1" / "a.jpg"), "SKU-1")
    restored = save(root / "SKU-1" / "a.jpg")
    os.utime(restored, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))  # 2001
    upsert = source.upsert_for(restored)
    assert upsert is not None and upsert.version > delete.version


def test_watcher_debounces_and_follows_changes(watching, tmp_path: Path) -> None:
    """While running: a file written in bursts is published once; a temp file renamed into place,
    a move, a delete, a folder moved in and one removed each give the right events."""
    root, rec, _ = watching
    target = root / "SKU-1" / "slow.jpg"
    target.parent.mkdir()
    data = (tmp_path / "x.jpg")
    save(data)
    blob = data.read_bytes()
    with target.open("wb") as fh:
        for i in range(5):
            fh.write(blob[i * len(blob) // 5 : (i + 1) * len(blob) // 5])
            fh.flush()
            time.sleep(0.1)
    assert summary(rec.wait(1)) == [("upsert", "slow.jpg", "SKU-1")]

    part = save(root / "SKU-1" / "dl.jpg.part", seed=2)
    part.rename(root / "SKU-1" / "dl.jpg")
    assert summary(rec.wait(1)) == [("upsert", "dl.jpg", "SKU-1")]

    (root / "SKU-1" / "dl.jpg").rename(root / "SKU-2-moved.jpg")  # to the root: no SKU, just gone
    (root / "SKU-2").mkdir()
    target.rename(root / "SKU-2" / "slow.jpg")
    assert summary(rec.wait(3)) == [("delete", "dl.jpg", "SKU-1"), ("delete", "slow.jpg", "SKU-1"),
                                    ("upsert", "slow.jpg", "SKU-2")]

    outside = tmp_path / "incoming" / "SKU-3"
    save(outside / "p.jpg", seed=3)
    save(outside / "q.png", seed=4)
    shutil.move(str(outside), str(root / "SKU-3"))
    assert summary(rec.wait(2)) == [("upsert", "p.jpg", "SKU-3"), ("upsert", "q.png", "SKU-3")]

    (root / "SKU-2" / "slow.jpg").unlink()
    assert summary(rec.wait(1)) == [("delete", "slow.jpg", "SKU-2")]


def test_folder_moved_away_is_deleted_by_the_ledger(watching, ledger, tmp_path: Path) -> None:
    """A SKU folder moved out of the root: its images (as the ledger knows them) are deleted."""
    root, rec, _ = watching
    files = [save(root / "SKU-7" / f"{i}.jpg", seed=i) for i in range(3)]
    rec.wait(3)
    for f in files:  # what the pipeline would have recorded
        ledger.accept(ImageEvent(uri=str(f), sku="SKU-7", version=1))
    shutil.move(str(root / "SKU-7"), str(tmp_path / "elsewhere"))
    assert summary(rec.wait(3)) == [("delete", f"{i}.jpg", "SKU-7") for i in range(3)]


def test_overflow_falls_back_to_a_rescan(make_settings, ledger, tmp_path: Path) -> None:
    """More changed paths than MAX_PENDING: the watcher drops them and rescans, missing nothing."""
    root = tmp_path / "root"
    root.mkdir()
    rec, stop = Recorder(), threading.Event()
    source = FolderSource(make_settings(), root, publish=rec)
    source.MAX_PENDING = 3
    t = threading.Thread(target=source.run, args=(stop,))
    t.start()
    try:
        time.sleep(0.5)
        for i in range(12):
            save(root / f"SKU-{i % 2}" / f"{i}.jpg", seed=i)
        events = rec.wait(12)
    finally:
        stop.set()
        t.join(10)
    assert {Path(e.uri).name for e in events} == {f"{i}.jpg" for i in range(12)}
    assert len(source._pending) <= 3


def test_missing_root_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sources folder ROOT --once` with no such folder: exit 2 naming it."""
    from worker.cli.main import app

    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["sources", "folder", str(tmp_path / "nope"), "--once"])
    assert result.exit_code == 2, result.output
    assert "nope" in result.output and "Traceback" not in result.output


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """The embedded stack (SQLite broker and state, worker processes, Milvus Lite server)."""
    from tests.stack import running_stack

    with running_stack(tmp_path_factory.mktemp("folder"), "embedded") as st:
        yield st


@pytest.mark.e2e
def test_folder_source_end_to_end(stack, tmp_path: Path) -> None:
    """Files added, replaced and deleted while the source runs, and while it is stopped (the
    rescan of `imgsync sources folder --once`), reach the ledger and Milvus."""
    from worker.index import IMAGES_ALIAS, MilvusStore

    root = tmp_path / "catalog"
    root.mkdir()
    ledger = Ledger(make_engine(stack.settings.effective_database_url))
    store = MilvusStore(stack.uri)

    def iid(path: Path) -> str:
        return image_id_for(normalize_uri(str(path)))

    def expect(want: dict[Path, tuple[str, str | None]], what: str, timeout: float = 90) -> None:
        """path -> (state, content hash to differ from, or None)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = ledger.rows([iid(p) for p in want])
            got = {p: rows[iid(p)].state if iid(p) in rows else None for p in want}
            fresh = all(rows[iid(p)].content_hash != old for p, (_, old) in want.items() if old and iid(p) in rows)
            if got == {p: s for p, (s, _) in want.items()} and fresh:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: ledger has {got}")
            time.sleep(0.2)
        held = {r["image_id"] for r in store.get_images(IMAGES_ALIAS, [iid(p) for p in want])}
        assert held == {iid(p) for p, (s, _) in want.items() if s == "indexed"}, what

    a, b, c = root / "SKU-1" / "a.jpg", root / "SKU-1" / "b.jpg", root / "SKU-2" / "c.jpg"
    stop = threading.Event()
    source = FolderSource(stack.settings, root)
    t = threading.Thread(target=source.run, args=(stop,))
    t.start()
    try:
        time.sleep(0.5)
        for i, path in enumerate((a, b, c)):
            save(path, seed=10 + i)
        expect({a: ("indexed", None), b: ("indexed", None), c: ("indexed", None)}, "added while running")
        old_b = ledger.get(iid(b)).content_hash
        save(b, seed=99)  # replaced in place
        a.unlink()
        expect({a: ("deleted", None), b: ("indexed", old_b), c: ("indexed", None)}, "replaced and deleted while running")
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()

    d = root / "SKU-3" / "d.jpg"
    old_c = ledger.get(iid(c)).content_hash
    save(d, seed=20)
    save(c, seed=21)
    b.unlink()
    proc = stack.cli("sources", "folder", str(root), "--once")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 delete(s)" in proc.stderr, proc.stderr
    expect({a: ("deleted", None), b: ("deleted", None), c: ("indexed", old_c), d: ("indexed", None)},
           "changed while stopped")
