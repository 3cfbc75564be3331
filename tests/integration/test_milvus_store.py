"""The Milvus store against a real Milvus Lite server."""

from __future__ import annotations

import subprocess
import sys
import uuid

import numpy as np
import pytest

from schemas.reasons import Reason
from worker.errors import ServiceUnavailable, TransientError
from worker.index import IMAGES_ALIAS, SKUS_ALIAS, ImageEntity, MilvusStore, version_names
from worker.index.lite_server import free_port


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_version_names_are_valid_and_distinct() -> None:
    """Collection names are Milvus-safe and differ for ids that slugify alike."""
    a = version_names("open_clip:ViT-B-32@openai#abc")
    b = version_names("open_clip:ViT-B-32@openai#abd")
    assert a.images != b.images and a.images.startswith("imgsync_images__")
    assert all(c.isalnum() or c == "_" for c in a.images + a.skus)


def test_upsert_get_search_delete(milvus_uri: str) -> None:
    """Vectors written are read back by primary key, found by search, and gone after delete."""
    store = MilvusStore(milvus_uri)
    names = store.ensure_version(f"test:{uuid.uuid4().hex}", 16)
    vecs = unit(np.random.default_rng(0), 5, 16)
    store.upsert_images(
        names,
        [ImageEntity(f"id{i}", "S", f"s3://b/{i}.jpg", vecs[i], "h", names.model_id, 1) for i in range(5)],
    )
    got = store.image_vectors(names.images, ["id1", "id3", "missing"])
    assert set(got) == {"id1", "id3"}
    np.testing.assert_allclose(got["id3"], vecs[3], atol=1e-6)
    store.delete_images(names.images, ["id3"])
    assert set(store.image_vectors(names.images, ["id1", "id3"])) == {"id1"}
    store.upsert_sku(names, "S", vecs[0], 4)
    row = store.get_skus(names.skus, ["S"])[0]
    assert row["image_count"] == 4 and row["model_id"] == names.model_id
    store.delete_sku(names, "S")
    assert store.get_skus(names.skus, ["S"]) == []
    store.close()


def test_aliases_move_only_on_cutover(milvus_uri: str, tmp_path) -> None:
    """The serving version gets the aliases when none exist; creating another version (even one that
    asks to serve) leaves them alone; point_aliases moves both, and back."""
    from worker.index import LiteServer

    with LiteServer(tmp_path / "m") as server:
        store = MilvusStore(server.uri)
        assert store.serving_collection() is None
        plain = store.ensure_version("model-0#1", 8)
        assert store.serving_collection() is None  # a building version never takes the aliases
        first = store.ensure_version("model-a#1", 8, serve_if_unset=True)
        second = store.ensure_version("model-b#1", 4, serve_if_unset=True)
        assert store.serving_collection() == first.images and plain.images != first.images
        v = unit(np.random.default_rng(1), 1, 8)[0]
        store.upsert_images(first, [ImageEntity("x", "S", "s3://b/x", v, "h", first.model_id, 1)])
        hits = store.search(v, limit=1)
        assert hits[0]["image_id"] == "x" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        store.point_aliases(second)
        assert store.alias_targets() == {IMAGES_ALIAS: second.images, SKUS_ALIAS: second.skus}
        assert store.search(np.ones(4, np.float32) / 2, limit=1) == []  # B is empty, and 4-d
        store.point_aliases(first)
        assert store.search(v, limit=1)[0]["image_id"] == "x"
        store.close()


def test_another_process_reads_what_this_one_wrote(milvus_uri: str) -> None:
    """A second process sees vectors written by this one at once (Strong consistency, one server)."""
    store = MilvusStore(milvus_uri)
    names = store.ensure_version(f"test:{uuid.uuid4().hex}", 4)
    store.upsert_images(names, [ImageEntity("p1", "S", "s3://b/p1", np.array([1, 0, 0, 0], np.float32), "h", names.model_id, 1)])
    code = (
        "import sys; from worker.index import MilvusStore; "
        f"s = MilvusStore({milvus_uri!r}); print(len(s.image_vectors({names.images!r}, ['p1'])))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1"
    store.close()


def test_unreachable_milvus_is_transient_and_names_setting() -> None:
    """A Milvus that does not answer gives a transient error naming IMGSYNC_MILVUS_URI, quickly."""
    import time

    uri = f"http://127.0.0.1:{free_port()}"
    store = MilvusStore(uri, timeout=2)
    started = time.monotonic()
    with pytest.raises(TransientError) as err:
        store.ensure_version("m#1", 4)
    assert isinstance(err.value, ServiceUnavailable)
    assert err.value.reason is Reason.index_unavailable
    assert "IMGSYNC_MILVUS_URI" in str(err.value) and uri in str(err.value)
    assert time.monotonic() - started < 15


def test_index_type_and_params_from_settings(milvus_uri: str, make_settings) -> None:
    """IMGSYNC_MILVUS_INDEX_TYPE/PARAMS shape new collections; search params reach the search."""
    from worker.index.milvus_store import store_for

    settings = make_settings(
        milvus_index_type="IVF_FLAT", milvus_index_params='{"nlist": 8}', milvus_search_params='{"nprobe": 8}'
    )
    assert settings.milvus_index_params == {"nlist": 8} and settings.as_env()["IMGSYNC_MILVUS_INDEX_PARAMS"] == '{"nlist": 8}'
    store = store_for(settings, milvus_uri)
    names = store.ensure_version(f"ivf:{uuid.uuid4().hex}", 8)
    index = store.client.describe_index(names.images, "vector")
    assert index["index_type"] == "IVF_FLAT", index  # (Milvus Lite does not echo nlist back)
    v = unit(np.random.default_rng(3), 1, 8)[0]
    store.upsert_images(names, [ImageEntity("ivf1", "S", "s3://b/ivf1", v, "h", names.model_id, 1)])
    assert store.search(v, limit=1, collection=names.images)[0]["image_id"] == "ivf1"
    store.close()
    # Milvus Lite neither echoes nor checks nlist: check what the store sends
    (sent,) = list(store._index_params())
    assert sent.index_type == "IVF_FLAT" and sent.to_dict()["nlist"] == 8, sent


def test_bad_index_params_are_a_settings_error(make_settings) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="JSON"):
        make_settings(milvus_index_params="{M: 16")
    with pytest.raises(ValidationError):
        make_settings(milvus_index_type="DISKANN_TYPO")
