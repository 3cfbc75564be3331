"""Admin operations at their edges, in-process on an embedded (SQLite) ledger and a Milvus Lite
server of this module: a background build sent while workers are busy, a build whose images are
deleted meanwhile, what a refused cutover reports, and versions named by a relative spec."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from config.settings import Settings
from schemas.events import ImageEvent
from schemas.outputs import ErrorOutput
from tests.helpers import photo
from worker.cli.main import app
from worker.encoders.spec import anchored_spec
from worker.ledger import ImageState, IndexedImage, Ledger, make_engine, upgrade
from worker.ledger.tables import images

runner = CliRunner()


@pytest.fixture(scope="module")
def own_milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Milvus Lite server of this module's own: its tests move the serving aliases."""
    from worker.index import LiteServer

    server = LiteServer(tmp_path_factory.mktemp("ops-audit") / "milvus")
    server.start()
    yield server.uri
    server.stop()


def _ledger() -> Ledger:
    url = Settings(_env_file=None).effective_database_url  # type: ignore[call-arg]
    upgrade(url)
    return Ledger(make_engine(url))


def _indexed(ledger: Ledger, model_id: str, *uris: str, sku: str = "SKU-1") -> list[ImageEvent]:
    events = [ImageEvent(uri=u, sku=sku) for u in uris]
    ledger.accept_many(events, "r")
    ledger.mark_indexed([IndexedImage(e.image_id, e.version, "h", model_id, "r") for e in events])
    return events


class _Worker:
    """A dispatcher whose preprocess messages a worker's runtime takes at once (as a busy worker
    would, its list of versions read a moment ago); encode messages are kept."""

    def __init__(self, rt) -> None:  # type: ignore[no-untyped-def]
        self.rt, self.outcomes, self.encoded = rt, [], []

    def preprocess_many(self, payloads) -> None:  # type: ignore[no-untyped-def]
        from worker.pipeline import preprocess

        self.outcomes += [preprocess(self.rt, self, p) for p in payloads]

    def encode(self, payload) -> None:  # type: ignore[no-untyped-def]
        self.encoded.append(payload)

    def refresh_sku(self, *_: object, **__: object) -> None:
        pass


def test_a_build_sent_right_after_its_version_is_registered_reaches_busy_workers(
    home: Path, own_milvus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reindex --model` of a new version: a worker whose list of active versions is a moment old
    still encodes the images the command sends, instead of dropping them as stale (the command then
    followed a build that never came)."""
    from worker import celery_app
    from worker.runtime import Runtime

    monkeypatch.setenv("IMGSYNC_MILVUS_URI", own_milvus)
    pic = tmp_path / "cat" / "SKU-1" / "1.jpg"
    pic.parent.mkdir(parents=True)
    photo(120, 100, seed=3).save(pic)
    _ledger().engine.dispose()
    rt = Runtime(Settings(_env_file=None))  # type: ignore[call-arg]
    serving = rt.serving()  # the worker registers the configured model and caches the versions
    _indexed(rt.ledger, serving.model_id, pic.as_uri())
    worker = _Worker(rt)
    monkeypatch.setattr(celery_app, "configure", lambda settings: None)
    monkeypatch.setattr(celery_app, "dispatcher", lambda: worker)
    rt.active_versions()  # read a moment before the command registers the new version

    result = runner.invoke(app, ["reindex", "--all", "--model", "random:16", "--no-wait", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["queued"] == 1
    assert worker.outcomes == ["queued"]
    assert [p.model_id for p in worker.encoded] == [plan["model_id"]]
    rt.ledger.engine.dispose()


def test_a_worker_rereads_its_versions_for_a_build_of_a_version_it_does_not_know(
    home: Path, own_milvus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build message naming a version registered after the worker last read its versions (the
    worker's cache still fresh): the worker reads them again and encodes for it, instead of dropping
    the message as stale."""
    from schemas.tasks import PreprocessPayload
    from worker.runtime import Runtime

    monkeypatch.setenv("IMGSYNC_MILVUS_URI", own_milvus)
    monkeypatch.setattr(Runtime, "VERSIONS_TTL", 3600.0)  # the cache would never expire by itself
    pic = tmp_path / "cat" / "SKU-1" / "1.jpg"
    pic.parent.mkdir(parents=True)
    photo(120, 100, seed=4).save(pic)
    _ledger().engine.dispose()
    rt = Runtime(Settings(_env_file=None))  # type: ignore[call-arg]
    (event,) = _indexed(rt.ledger, rt.serving().model_id, pic.as_uri())
    other = Runtime(Settings(_env_file=None, model="random:16"))  # type: ignore[call-arg]
    target = other.register_candidate("random:16")
    worker = _Worker(rt)
    worker.preprocess_many([PreprocessPayload(event=rt.ledger.get(event.image_id).event("reindex"), models=[target.model_id])])
    assert worker.outcomes == ["queued"]
    assert [p.model_id for p in worker.encoded] == [target.model_id]
    rt.ledger.engine.dispose()
    other.ledger.engine.dispose()


def test_following_a_build_ends_when_an_image_is_deleted_meanwhile(home: Path) -> None:
    """An image of the build's scope deleted while the build runs counts as settled: following the
    build ends (it waited forever without --timeout) and reports it."""
    from worker.cli.versions import follow_build

    ledger = _ledger()
    ledger.register_version("model-a", "tiny", "imgsync_images__a", "imgsync_skus__a", 64, serve_if_first=True)
    kept, gone = _indexed(ledger, "model-a", "s3://b/SKU-1/1.jpg", "s3://b/SKU-1/2.jpg")
    with ledger.engine.begin() as conn:
        conn.execute(images.update().where(images.c.image_id == gone.image_id).values(state=ImageState.deleted))
    started = time.monotonic()
    done = follow_build(ledger, "model-a", [kept.image_id, gone.image_id], timeout=20, show_progress=False)
    assert time.monotonic() - started < 10
    assert done == (1, 0, 1)  # covered, failed, deleted
    ledger.engine.dispose()


def test_a_refused_cutover_reports_what_still_serves(home: Path) -> None:
    """`cutover --json` refused (incomplete version): exit 1, `changed` false, `serving` the version
    that still serves, `target` the one asked for."""
    ledger = _ledger()
    ledger.register_version("model-a", "tiny", "imgsync_images__a", "imgsync_skus__a", 64, serve_if_first=True)
    ledger.register_version("model-b", "random:16", "imgsync_images__b", "imgsync_skus__b", 16, serve_if_first=False)
    _indexed(ledger, "model-a", "s3://b/SKU-1/1.jpg")
    ledger.engine.dispose()
    result = runner.invoke(app, ["cutover", "model-b", "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert (doc["changed"], doc["serving"], doc["target"], doc["previous"]) == (False, "model-a", "model-b", "model-a")


def test_a_version_is_found_by_the_relative_spec_it_was_built_with(home: Path, own_milvus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger keeps a spec's local paths absolute; the same relative spec given again names
    that version: `reindex --model … --dry-run` shows it building (not new) and `cutover` finds it."""
    monkeypatch.setenv("IMGSYNC_MILVUS_URI", own_milvus)
    (tmp_path / "w.pt").write_bytes(b"weights")
    spec = "open_clip:ViT-B-32@w.pt"
    ledger = _ledger()
    ledger.register_version("model-a", "tiny", "imgsync_images__a", "imgsync_skus__a", 64, serve_if_first=True)
    ledger.register_version("model-b", anchored_spec(spec), "imgsync_images__b", "imgsync_skus__b", 512, serve_if_first=False)
    _indexed(ledger, "model-a", "s3://b/SKU-1/1.jpg")
    ledger.engine.dispose()
    dry = runner.invoke(app, ["reindex", "--all", "--model", spec, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert (json.loads(dry.stdout)["model_id"], json.loads(dry.stdout)["status"]) == ("model-b", "building")
    cut = runner.invoke(app, ["cutover", spec, "--json"])
    assert cut.exit_code == 1, cut.output  # found, and refused: it holds no image yet
    assert json.loads(cut.stdout)["target"] == "model-b"


def test_nothing_failed_then_failed_scopes_answer_empty(home: Path) -> None:
    """`reindex --failed` and `failures replay` with nothing failed: `{"results": []}`, exit 0."""
    _ledger().engine.dispose()
    for args in (["reindex", "--failed", "--json"], ["failures", "replay", "--json"], ["failures", "replay", "--wait", "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["results"] == []


def test_the_dry_run_of_a_retired_version_plans_what_its_build_would_send(home: Path, own_milvus: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`reindex --model SPEC --dry-run` of a retired version: it is built again, so the plan names it
    and counts the vectors it still holds (not a new version that lacks every image)."""
    monkeypatch.setenv("IMGSYNC_MILVUS_URI", own_milvus)
    ledger = _ledger()
    ledger.register_version("model-a", "tiny", "imgsync_images__a", "imgsync_skus__a", 64, serve_if_first=True)
    ledger.register_version("model-b", "random:16", "imgsync_images__b", "imgsync_skus__b", 16, serve_if_first=False)
    events = _indexed(ledger, "model-a", "s3://b/SKU-1/1.jpg", "s3://b/SKU-1/2.jpg")
    ledger.mark_indexed([IndexedImage(events[0].image_id, events[0].version, "h", "model-b", "r")])
    ledger.retire("model-b")
    ledger.engine.dispose()
    result = runner.invoke(app, ["reindex", "--all", "--model", "random:16", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["model_id"], plan["status"], plan["images"], plan["to_encode"]) == ("model-b", "retired", 2, 1)
    nothing = runner.invoke(app, ["rollback"])
    assert nothing.exit_code == 2 and "nothing to roll back" in nothing.output


def test_a_model_build_of_an_empty_scope_registers_no_version(
    home: Path, own_milvus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reindex --sku NOPE --model SPEC` (a mistyped SKU, a prefix with nothing under it) does not
    register SPEC as a building version, which every later upload would be encoded for; the plan
    says status new, nothing queued, exit 0. The same build of a scope holding images registers it."""
    monkeypatch.setenv("IMGSYNC_MILVUS_URI", own_milvus)
    ledger = _ledger()
    ledger.register_version("model-a", "tiny", "imgsync_images__a", "imgsync_skus__a", 64, serve_if_first=True)
    _indexed(ledger, "model-a", "s3://b/SKU-1/1.jpg")
    (bad,) = [ImageEvent(uri="s3://b/SKU-F/1.jpg", sku="SKU-F")]
    ledger.accept_many([bad], "r")
    ledger.mark_failed(bad.image_id, bad.version, "corrupt", "garbage", "r")
    for scope in (["--sku", "NOPE"], ["--prefix", "s3://nothing-here/"], ["--sku", "SKU-F"]):  # SKU-F: failed images only
        result = runner.invoke(app, ["reindex", *scope, "--model", "random:16", "--json"])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        assert (plan["model_id"], plan["status"], plan["images"], plan["queued"]) == (None, "new", 0, 0)
        assert [v.model_id for v in ledger.versions()] == ["model-a"]
    result = runner.invoke(app, ["reindex", "--sku", "SKU-1", "--model", "random:16", "--no-wait", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "building"
    assert len(ledger.versions()) == 2
    ledger.engine.dispose()


@pytest.mark.parametrize(
    "spec",
    ["bogus:x", "nonsense", "open_clip:", "open_clip:NoSuchArch", "open_clip:ViT-B-32@./no-such.pt",
     "open_clip:ViT-B-32@no_such_tag", "timm:no_such_net", "hf:./no-such-folder"],
)  # fmt: skip
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "build"])
def test_a_model_spec_that_cannot_load_is_a_usage_error(home: Path, spec: str, dry_run: bool) -> None:
    """`reindex --model SPEC` with a spec that cannot load exits 2 naming --model (where the value
    came from, not IMGSYNC_MODEL), the dry run included, and registers nothing."""
    ledger = _ledger()
    result = runner.invoke(app, ["reindex", "--all", "--model", spec, "--json", *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2, result.output
    assert "--model" in result.stderr and "IMGSYNC_MODEL" not in result.stderr, result.stderr
    error = ErrorOutput.model_validate_json(result.stdout).error  # --json: the error is stdout's one document
    assert error.kind == "usage" and "--model" in error.message
    assert [v.spec for v in ledger.versions()] in ([], ["tiny"])
    ledger.engine.dispose()


def test_verify_checks_a_version_that_does_not_serve(home: Path, own_milvus: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`verify --model` checks a building (or standby) version against what the ledger records of it:
    clean when its vectors and SKU mean are its records', an image it does not hold yet counted as
    uncovered (no problem); a record without vector (missing), a vector of other content (stale), a
    vector of an image the ledger does not hold (orphan: a rollback would serve it) and the SKU mean
    they break are found, exit 1; --repair deletes the orphan from that version's collection; a
    retired version is refused (exit 2)."""
    import numpy as np

    from worker.encoders.base import l2_normalize
    from worker.index.milvus_store import ImageEntity, store_for

    monkeypatch.setenv("IMGSYNC_MILVUS_URI", own_milvus)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    store = store_for(settings, own_milvus)
    ledger = _ledger()
    na, nb = store.ensure_version("verify-a", 8), store.ensure_version("verify-b", 8)
    ledger.register_version("verify-a", "tiny", na.images, na.skus, 8, serve_if_first=True)
    ledger.register_version("verify-b", "random:8", nb.images, nb.skus, 8, serve_if_first=False)
    events = [ImageEvent(uri=f"s3://b/SKU-V/{i}.jpg", sku="SKU-V") for i in range(3)]
    ledger.accept_many(events, "r")
    ledger.mark_indexed([IndexedImage(e.image_id, e.version, f"h{i}", "verify-a", "r") for i, e in enumerate(events)])
    ledger.mark_indexed([IndexedImage(e.image_id, e.version, f"h{i}", "verify-b", "r") for i, e in enumerate(events[:2])])
    rng = np.random.default_rng(3)
    vecs = [l2_normalize(rng.normal(size=8).astype(np.float32)) for _ in range(3)]

    def entity(i: int, image_id: str | None = None, content: str | None = None) -> ImageEntity:
        return ImageEntity(image_id or events[i].image_id, "SKU-V", events[i].uri, vecs[i], content or f"h{i}", "verify-b", 0)

    store.upsert_images(nb, [entity(0), entity(1)])
    store.upsert_skus(nb, [("SKU-V", l2_normalize(np.mean(vecs[:2], axis=0)), 2)])
    store.flush()
    dirty = ledger.sku_generations(["SKU-V"])["SKU-V"][0]
    assert ledger.finish_skus([("SKU-V", dirty, 3)], "verify-a") == []

    def check(*extra: str) -> tuple[int, dict]:
        result = runner.invoke(app, ["verify", "--model", "verify-b", "--json", *extra])
        return result.exit_code, json.loads(result.stdout or "{}") if result.exit_code != 2 else result.output

    code, doc = check()
    assert code == 0, doc
    assert (doc["problems"], doc["model_id"], doc["status"], doc["uncovered"]) == (0, "verify-b", "building", 1)
    orphan = "f" * 32
    store.delete_images(nb.images, [events[0].image_id])
    store.upsert_images(nb, [entity(1, content="other"), entity(2, image_id=orphan)])
    store.flush()
    code, doc = check()
    assert code == 1, doc
    assert (doc["missing"], doc["stale"], doc["orphans"], doc["sku_mismatch"]) == (
        [events[0].image_id], [events[1].image_id], [orphan], ["SKU-V"]
    )
    from worker import verify as verifying

    class Recorder:  # what the repair sends, instead of a broker
        def __init__(self) -> None:
            self.payloads: list = []

        def preprocess_many(self, payloads: list) -> None:
            self.payloads += payloads

        def refresh_skus(self, *_: object, **__: object) -> None:
            pass

    sent = Recorder()
    report = verifying.verify_version(ledger, store, ledger.version("verify-b"))  # type: ignore[arg-type]
    verifying.repair(report, ledger, store, sent)  # type: ignore[arg-type]
    assert sorted(p.event.image_id for p in sent.payloads) == sorted([events[0].image_id, events[1].image_id])
    assert all(p.models == ["verify-b"] and p.force for p in sent.payloads)  # that version alone, not the serving one
    store.flush()
    assert store.get_images(nb.images, [orphan]) == []
    code, doc = check("--repair")
    assert code == 1 and doc["orphans"] == [] and doc["repaired"]["reencode"] == 2, doc
    ledger.retire("verify-b")
    result = runner.invoke(app, ["verify", "--model", "verify-b"])
    assert result.exit_code == 2 and "retired" in result.output
    store.close()
    ledger.engine.dispose()


def test_verify_finds_wrong_fields_and_lost_collections_and_repair_makes_them_again(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image vector whose row names another SKU is stale (verify compared hash and model only:
    search answered the wrong SKU, verify said clean). A serving SKU collection and alias that
    Milvus lost are read as empty: every SKU mismatches and the collection is named (verify exited
    3, "unreachable", though Milvus answered, and nothing could repair it); --repair makes them
    again and re-encodes into the serving version only. Its own Milvus server: it drops collections."""
    import numpy as np
    from pymilvus import MilvusClient

    from worker import verify as verifying
    from worker.encoders.base import l2_normalize
    from worker.index import SKUS_ALIAS, LiteServer
    from worker.index.milvus_store import ImageEntity, store_for

    server = LiteServer(tmp_path / "milvus")
    server.start()
    monkeypatch.setenv("IMGSYNC_MILVUS_URI", server.uri)
    store = store_for(Settings(_env_file=None), server.uri)  # type: ignore[call-arg]
    ledger = _ledger()
    try:
        names = store.ensure_version("lost-a", 8, serve_if_unset=True)
        ledger.register_version("lost-a", "tiny", names.images, names.skus, 8, serve_if_first=True)
        events = _indexed(ledger, "lost-a", *(f"s3://b/SKU-L/{i}.jpg" for i in range(3)), sku="SKU-L")
        rng = np.random.default_rng(5)
        vecs = [l2_normalize(rng.normal(size=8).astype(np.float32)) for _ in events]

        def entity(i: int, sku: str = "SKU-L") -> ImageEntity:
            return ImageEntity(events[i].image_id, sku, events[i].uri, vecs[i], "h", "lost-a", 0)

        store.upsert_images(names, [entity(i) for i in range(3)])
        store.upsert_skus(names, [("SKU-L", l2_normalize(np.mean(vecs, axis=0)), 3)])
        store.flush()
        dirty = ledger.sku_generations(["SKU-L"])["SKU-L"][0]
        assert ledger.finish_skus([("SKU-L", dirty, 3)], "lost-a") == []

        def check() -> tuple[int, dict]:
            result = runner.invoke(app, ["verify", "--json"])
            assert result.exit_code in (0, 1), result.output
            return result.exit_code, json.loads(result.stdout)

        code, doc = check()
        assert (code, doc["problems"], doc["collections_missing"]) == (0, 0, [])
        store.upsert_images(names, [entity(1, sku="SKU-WRONG")])
        code, doc = check()
        assert (code, doc["stale"], doc["missing"]) == (1, [events[1].image_id], [])
        store.upsert_images(names, [entity(1)])
        client = MilvusClient(uri=server.uri)
        client.drop_alias(SKUS_ALIAS)
        client.drop_collection(names.skus)
        code, doc = check()
        assert (code, doc["collections_missing"], doc["sku_mismatch"], doc["missing"]) == (1, [SKUS_ALIAS], ["SKU-L"], [])

        class Recorder:  # what the repair sends, instead of a broker
            def __init__(self) -> None:
                self.payloads: list = []
                self.skus: list = []

            def preprocess_many(self, payloads: list) -> None:
                self.payloads += payloads

            def refresh_skus(self, skus: list, **_: object) -> None:
                self.skus += skus

        store.upsert_images(names, [entity(2, sku="SKU-WRONG")])
        sent = Recorder()
        verifying.repair(verifying.verify(ledger, store), ledger, store, sent)  # type: ignore[arg-type]
        assert store.has_version(names) and SKUS_ALIAS in client.list_aliases()["aliases"]
        assert sent.skus == ["SKU-L"] and [p.event.image_id for p in sent.payloads] == [events[2].image_id]
        assert all(p.models == ["lost-a"] for p in sent.payloads)  # the version checked, not every active one
        client.close()
    finally:
        store.close()
        ledger.engine.dispose()
        server.stop()


def test_a_milvus_call_failing_mid_command_names_milvus(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Milvus call that fails after the server answered (it went away, a timeout) is exit 3 naming
    Milvus and its setting, like an unreachable one (service and setting were null)."""
    from schemas.reasons import Reason
    from worker import verify as verifying
    from worker.errors import TransientError

    def failing(*_: object) -> None:
        raise TransientError(Reason.index_unavailable, "Milvus query failed: <_InactiveRpcError: StatusCode.UNAVAILABLE>")

    monkeypatch.setattr(verifying, "verify", failing)
    result = runner.invoke(app, ["verify", "--json"])
    assert result.exit_code == 3, result.output
    error = ErrorOutput.model_validate_json(result.stdout).error
    assert (error.kind, error.service, error.setting) == ("unreachable", "Milvus", "IMGSYNC_MILVUS_URI")
    assert "query failed" in error.message


def test_a_text_search_on_an_empty_index_is_refused_for_an_image_only_model(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`search --text` before anything is indexed: an image-only model (timm) is a usage error, exit 2,
    as it is once the index holds images; a model with a text tower answers no hits, exit 0."""
    from worker.index import LiteServer

    server = LiteServer(tmp_path / "empty-milvus")
    server.start()
    try:
        monkeypatch.setenv("IMGSYNC_MILVUS_URI", server.uri)
        monkeypatch.setenv("IMGSYNC_MODEL", "timm:resnet18")
        refused = runner.invoke(app, ["search", "--text", "red shoe", "--json"])
        assert refused.exit_code == 2 and "no text tower" in refused.stderr, refused.output
        monkeypatch.setenv("IMGSYNC_MODEL", "tiny")
        answered = runner.invoke(app, ["search", "--text", "red shoe", "--json"])
        assert answered.exit_code == 0 and json.loads(answered.stdout) == {"hits": []}, answered.output
    finally:
        server.stop()


def test_reindex_help_shows_the_whole_model_spec() -> None:
    """`reindex --help` shows `--model`'s spec with its optional `[@weights]` (not eaten as markup)."""
    result = runner.invoke(app, ["reindex", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "backend:name[@weights]" in result.output, result.output


def test_dead_letters_are_listed_with_who_refused_them_and_why(home: Path) -> None:
    """`failures dead-letters --json`: the messages set aside, newest first, with task, reason, error
    and body; `--task` narrows them; exit 1 while there are any, 0 (and an empty list) when none."""
    ledger = _ledger()
    empty = runner.invoke(app, ["failures", "dead-letters", "--json"])
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.stdout) == {"dead_letters": [], "by_task": {}}
    ledger.dead_letter(task="sources.sqs", body="{poison", reason="invalid_event", error="message m-1: not JSON")
    ledger.dead_letter(task="sources.webhook", body='{"hello": 1}', reason="invalid_event", error="not an S3 event notification")
    ledger.dead_letter(task="sources.sqs", body="[]", reason="invalid_event", error="message m-2: not a notification")
    ledger.engine.dispose()

    result = runner.invoke(app, ["failures", "dead-letters", "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["by_task"] == {"sources.sqs": 2, "sources.webhook": 1}
    assert [(d["task"], d["body"]) for d in doc["dead_letters"]] == [
        ("sources.sqs", "[]"), ("sources.webhook", '{"hello": 1}'), ("sources.sqs", "{poison"),
    ]
    assert doc["dead_letters"][2]["error"] == "message m-1: not JSON" and doc["dead_letters"][2]["reason"] == "invalid_event"
    only = json.loads(runner.invoke(app, ["failures", "dead-letters", "--task", "sources.webhook", "--since", "1h", "--json"]).stdout)
    assert [d["body"] for d in only["dead_letters"]] == ['{"hello": 1}']
    table = runner.invoke(app, ["failures", "dead-letters"], env={"COLUMNS": "200"})
    assert table.exit_code == 1 and "sources.webhook" in table.output and "by task: sources.sqs=2, sources.webhook=1" in table.output


def test_failures_show_names_the_state_of_any_image(home: Path) -> None:
    """`failures show --json` of an image that did not fail says so (`state`), as it does for a failed one."""
    ledger = _ledger()
    ledger.register_version("model-a", "tiny", "imgsync_images__a", "imgsync_skus__a", 64, serve_if_first=True)
    (event,) = _indexed(ledger, "model-a", "s3://b/SKU-1/ok.jpg")
    ledger.engine.dispose()
    result = runner.invoke(app, ["failures", "show", event.image_id, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["reason"]) == ("indexed", None)
    # times carry their zone, also from SQLite (which gives them back without one)
    from datetime import datetime, timedelta

    assert datetime.fromisoformat(doc["updated_at"]).utcoffset() == timedelta(0)


def test_a_version_prefix_ends_where_a_part_of_the_model_name_ends(home: Path) -> None:
    """`random:6` named the `random:64` version (a prefix of its id): `evaluate --model random:6`
    measured the wrong model, `cutover random:6` would switch to it. Within the name a prefix must
    end where a part ends; after the `@` it may stop anywhere (a digest typed short)."""
    from worker.cli.versions import resolve_version
    from worker.errors import ConfigError

    ledger = _ledger()
    ledger.register_version("random:64@pixels-sha256#d438eb2e37cb", "random:64", "i1", "s1", 64, serve_if_first=True)
    assert resolve_version(ledger, "random:64").spec == "random:64"
    assert resolve_version(ledger, "random").spec == "random:64"
    assert resolve_version(ledger, "random:64@pixels-sha256#d4").spec == "random:64"
    with pytest.raises(ConfigError, match="not a known model version"):
        resolve_version(ledger, "random:6")
    ledger.engine.dispose()


def test_search_refuses_a_query_that_is_no_picture_or_too_large_also_on_an_empty_index(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an empty index a text file as --image answered `{"hits": []}`, exit 0 (exit 2 once anything
    was indexed); a query file over IMGSYNC_MAX_IMAGE_BYTES was read whole into memory."""
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    result = runner.invoke(app, ["search", "--image", str(text), "--json"])
    assert result.exit_code == 2, result.output
    assert "unsupported_format" in ErrorOutput.model_validate_json(result.stdout).error.message
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + b"\0" * 2048)
    monkeypatch.setenv("IMGSYNC_MAX_IMAGE_BYTES", "1024")
    result = runner.invoke(app, ["search", "--image", str(big), "--json"])
    assert result.exit_code == 2 and "IMGSYNC_MAX_IMAGE_BYTES" in result.output, result.output


def test_search_with_the_serving_aliases_lost_is_not_an_empty_answer(home: Path, tmp_path: Path) -> None:
    """The ledger holds indexed images but Milvus has no serving alias (lost): search answered no
    hits, exit 0; now exit 3 naming Milvus and the repair."""
    ledger = _ledger()
    ledger.register_version("lost-b", "tiny", "imgsync_images__lostb", "imgsync_skus__lostb", 64, serve_if_first=True)
    _indexed(ledger, "lost-b", "s3://b/SKU-1/a.jpg")
    ledger.engine.dispose()
    query = tmp_path / "q.jpg"
    photo(64, 48, seed=1).save(query)
    result = runner.invoke(app, ["search", "--image", str(query), "--json"])
    assert result.exit_code == 3, result.output
    error = ErrorOutput.model_validate_json(result.stdout).error
    assert error.service == "Milvus" and "verify --repair" in error.message
