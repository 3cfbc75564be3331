"""A model switch with no outage, on the embedded stack with real worker processes: index with model
A (``tiny``, 64-d), build model B (``timm:resnet18`` with random weights, 512-d: a real architecture;
no hub here) in the background while searches keep answering from A, cut over, roll back."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import photo
from tests.stack import running_stack
from worker.encoders.base import l2_normalize
from worker.index import IMAGES_ALIAS, SKUS_ALIAS, MilvusStore
from worker.ledger import Ledger, make_engine
from worker.search import run_search

pytestmark = pytest.mark.e2e

MODEL_B = "timm:resnet18"


def test_build_cutover_rollback_without_a_failed_search(tmp_path: Path, catalog) -> None:
    root = catalog(n_skus=3, per_sku=3)
    query = next(root.rglob("*.jpg"))
    with running_stack(tmp_path / "stack") as st:
        proc = st.cli("index", str(root), "--wait", "--json", "--timeout", "240")
        assert proc.returncode == 0, proc.stderr[-2000:]
        ledger = Ledger(make_engine(st.settings.effective_database_url))
        model_a = ledger.serving_version()
        assert model_a is not None and model_a.dim == 64

        # searches run all along; each records the dim of the version that answered (via its SKU hit)
        answered: list[tuple[float, str]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def searcher() -> None:
            while not stop.is_set():
                try:
                    hits = run_search(st.settings, st.uri, image=query, text=None, skus=False, limit=3)
                    assert hits and hits[0].score > 0.99  # the query is an indexed image: it finds itself
                    store = MilvusStore(st.uri)
                    answered.append((time.monotonic(), store.alias_targets()[IMAGES_ALIAS]))
                    store.close()
                except BaseException as exc:  # noqa: BLE001 - any failed search fails the test
                    errors.append(exc)
                time.sleep(0.1)

        thread = threading.Thread(target=searcher, daemon=True)
        thread.start()
        try:
            dry = st.cli("reindex", "--all", "--model", MODEL_B, "--dry-run", "--json")
            assert dry.returncode == 0, dry.stderr[-2000:]
            plan = json.loads(dry.stdout)
            assert (plan["images"], plan["to_encode"], plan["status"], plan["skus"]) == (9, 9, "new", 3)
            assert plan["measured_images_per_second"] > 0 and plan["estimated_seconds"] > 0
            assert len(ledger.versions()) == 1  # the dry run registered nothing

            # interrupted: the command stops following (timeout) before the build is done
            cut_short = st.cli("reindex", "--all", "--model", MODEL_B, "--json", "--timeout", "0.2")
            assert cut_short.returncode == 1, cut_short.stderr[-2000:]
            assert json.loads(cut_short.stdout)["covered"] < 9
            # resumed: the rerun queues only what the version still lacks and finishes
            build = st.cli("reindex", "--all", "--model", MODEL_B, "--json", "--timeout", "240")
            assert build.returncode == 0, build.stderr[-2000:]
            built = json.loads(build.stdout)
            assert (built["covered"], built["failed"]) == (9, 0)
            model_b = built["model_id"]
            assert model_b != model_a.model_id
            store = MilvusStore(st.uri)
            assert store.serving_collection() == model_a.images_collection  # A still serves
            assert ledger.version(model_b).status == "building"

            # a rerun is resumable and free: nothing left to encode
            again = st.cli("reindex", "--all", "--model", MODEL_B, "--json", "--timeout", "60")
            assert json.loads(again.stdout)["to_encode"] == 0

            # every B vector is 512-d and B's SKU vectors are the normalized means of B's image vectors
            vb = ledger.version(model_b)
            _wait_skus_clean(ledger)
            ids = [r.image_id for r in ledger.select()]
            vecs = store.image_vectors(vb.images_collection, ids)
            assert len(vecs) == 9 and {v.shape[0] for v in vecs.values()} == {512}
            assert store.count(vb.images_collection) == 9  # each image once
            for sku_row in store.get_skus(vb.skus_collection, sorted({r.sku for r in ledger.select()})):
                members = ledger.sku_members(sku_row["sku"], model_b)
                mean = l2_normalize(np.mean(np.stack([vecs[i] for i in members]), axis=0))
                assert np.allclose(np.asarray(sku_row["vector"]), mean, atol=1e-5)
                assert sku_row["image_count"] == len(members) == 3

            cut = st.cli("cutover", model_b, "--json")
            assert cut.returncode == 0, cut.stderr[-2000:]
            doc = json.loads(cut.stdout)
            assert doc["changed"] and doc["previous"] == model_a.model_id and doc["covered"] == doc["total"] == 9
            assert store.alias_targets() == {IMAGES_ALIAS: vb.images_collection, SKUS_ALIAS: vb.skus_collection}
            hits = run_search(st.settings, st.uri, image=query, text=None, skus=False, limit=1)
            assert hits[0].score > 0.99  # answered by B, with B's model encoding the query

            # while B serves, A stands by and is kept in sync: a new image reaches both
            extra = root / "SKU-NEW" / "new.jpg"
            extra.parent.mkdir()
            photo(320, 240, seed=4242).save(extra, quality=90)
            added = st.cli("index", str(extra), "--wait", "--json", "--timeout", "240")
            assert added.returncode == 0, added.stderr[-2000:]
            new_id = json.loads(added.stdout)["results"][0]["image_id"]
            _wait_until(lambda: set(ledger.vector_rows(new_id)) == {model_a.model_id, model_b})

            back = st.cli("rollback", "--json")
            assert back.returncode == 0, back.stderr[-2000:]
            assert json.loads(back.stdout)["serving"] == model_a.model_id
            assert store.serving_collection() == model_a.images_collection
            assert store.image_vectors(model_a.images_collection, [new_id])  # A got the new image meanwhile
            assert ledger.version(model_b).status == "standby"
            store.close()
        finally:
            stop.set()
            thread.join(30)
        assert not errors, errors[:3]
        served = [coll for _, coll in answered]
        assert vb.images_collection in served and served[0] == model_a.images_collection and served[-1] == model_a.images_collection
        ledger.engine.dispose()


def test_cutover_refuses_an_incomplete_version(tmp_path: Path, catalog) -> None:
    """Unknown versions are exit 2 with the known ones listed; nothing to roll back to is exit 2; an
    incomplete version is refused; an abandoned build can be retired (not the serving version)."""
    with running_stack(tmp_path / "stack") as st:
        root = catalog(n_skus=1, per_sku=2)
        assert st.cli("index", str(root), "--wait", "--timeout", "120").returncode == 0
        unknown = st.cli("cutover", "no-such-model")
        assert unknown.returncode == 2 and "known versions" in unknown.stderr
        nothing = st.cli("rollback")
        assert nothing.returncode == 2 and "nothing to roll back" in nothing.stderr
        encode = st.procs[1]
        os.kill(encode.pid, signal.SIGSTOP)  # B cannot be encoded: it stays incomplete, whatever the timing
        try:
            queued = st.cli("reindex", "--all", "--model", MODEL_B, "--no-wait", "--json")
            assert queued.returncode == 0, queued.stderr[-2000:]
            model_b = json.loads(queued.stdout)["model_id"]
            ledger = Ledger(make_engine(st.settings.effective_database_url))
            assert not ledger.coverage(model_b).complete
            refused = st.cli("cutover", model_b, "--json")  # refused without --force
            assert refused.returncode == 1 and json.loads(refused.stdout)["changed"] is False
        finally:
            os.kill(encode.pid, signal.SIGCONT)
        serving = ledger.serving_version().model_id
        assert st.cli("retire", serving).returncode == 2  # the serving version cannot retire
        gone = st.cli("retire", MODEL_B, "--json")  # by spec
        assert gone.returncode == 0 and json.loads(gone.stdout)["model_id"] == model_b
        assert [v.model_id for v in ledger.versions()] == [serving]  # no longer written to
        ledger.engine.dispose()


def _wait_skus_clean(ledger: Ledger, timeout: float = 60) -> None:
    _wait_until(lambda: ledger.sku_counts()[1] == 0, timeout)


def _wait_until(cond, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
