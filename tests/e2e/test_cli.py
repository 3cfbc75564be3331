"""The CLI as a person and a script use it: help, JSON documents, exit codes, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas.outputs import ErrorOutput, StatusOutput
from worker.cli.main import app
from worker.index.lite_server import free_port

runner = CliRunner()

COMMANDS = [
    "demo", "up", "worker", "index", "search", "status", "db", "failures", "verify", "reindex",
    "cutover", "rollback", "retire", "failures dead-letters", "sources", "sources sqs", "sources webhook", "sources outbox", "sources folder",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    """Each command answers --help with exit 0."""
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bad_setting_is_exit_2_one_line(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid setting: exit 2, one line naming the variable, no traceback."""
    monkeypatch.setenv("IMGSYNC_BATCH_MAX", "0")
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 2
    assert "IMGSYNC_BATCH_MAX" in result.output and "Traceback" not in result.output


def test_setting_errors_show_no_secret_and_name_the_variable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A check across settings names them without dumping every value (no token, no password); an
    unknown .env key keeps its own name; a database password never reaches stderr."""
    monkeypatch.setenv("IMGSYNC_BROKER_VISIBILITY_TIMEOUT", "10")
    monkeypatch.setenv("IMGSYNC_MILVUS_TOKEN", "tok-s3cr3t")
    monkeypatch.setenv("IMGSYNC_DATABASE_URL", f"postgresql+psycopg://u:PGs3cr3t@127.0.0.1:{free_port()}/x")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2 and "IMGSYNC_BROKER_VISIBILITY_TIMEOUT" in result.output, result.output
    assert "s3cr3t" not in result.output and "IMGSYNC_:" not in result.output
    monkeypatch.delenv("IMGSYNC_BROKER_VISIBILITY_TIMEOUT")
    result = runner.invoke(app, ["failures", "list"])
    assert result.exit_code == 3 and "IMGSYNC_DATABASE_URL" in result.output and "u:***@" in result.output
    assert "s3cr3t" not in result.output
    monkeypatch.delenv("IMGSYNC_DATABASE_URL")
    (home.parent / ".env").write_text("IMGSYNC_NO_SUCH_THING=1\n")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2 and "IMGSYNC_NO_SUCH_THING: " in result.output and "IMGSYNC_IMGSYNC" not in result.output


def test_error_text_is_shown_as_given(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error message is not read as rich markup or emoji codes: the value given is shown as it is."""
    monkeypatch.setenv("IMGSYNC_BATCH_MAX", "x:abc:[red]y[/]")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2 and "x:abc:[red]y[/]" in result.output, result.output


def test_bad_model_spec_is_exit_2(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`worker` with an unknown backend fails at startup naming IMGSYNC_MODEL and the backends."""
    monkeypatch.setenv("IMGSYNC_MODEL", "nope:thing")
    monkeypatch.setenv("IMGSYNC_MILVUS_URI", f"http://127.0.0.1:{free_port()}")
    result = runner.invoke(app, ["worker", "--queues", "encode"])
    assert result.exit_code == 2
    assert "IMGSYNC_MODEL" in result.output and "open_clip" in result.output


@pytest.mark.parametrize("command", [["status", "--json"], ["reindex", "--all", "--dry-run", "--json"], ["failures", "list"]])
def test_a_malformed_model_spec_is_exit_2_for_every_command(home: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    """Not only the commands that load the model: a spec that cannot be parsed is a usage error."""
    monkeypatch.setenv("IMGSYNC_MODEL", "bogus:foo")
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "IMGSYNC_MODEL" in result.output and "open_clip" in result.output and "Traceback" not in result.output


def test_unknown_queue_is_exit_2(home: Path) -> None:
    """`worker --queues` refuses names it does not know, listing the valid ones."""
    result = runner.invoke(app, ["worker", "--queues", "encode,bogus"])
    assert result.exit_code == 2 and "bogus" in result.output and "preprocess" in result.output


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--queues", ","], "no queue named"), (["--concurrency", "-3"], "--concurrency"), (["--loglevel", "LOUD"], "--loglevel")],
)
def test_worker_options_that_name_nothing_are_exit_2(home: Path, args: list[str], says: str) -> None:
    """`--queues ,` started a worker on no queue, `--concurrency -3` crashed inside Celery and exited
    0, an unknown log level raised a traceback: each is a usage error, before any worker starts."""
    result = runner.invoke(app, ["worker", *args])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output


def test_unreachable_milvus_is_exit_3(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search against a Milvus that does not answer: exit 3, naming the setting and the URL."""
    from tests.helpers import photo

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("IMGSYNC_MILVUS_URI", uri)
    q = tmp_path / "q.jpg"
    photo(64, 64, seed=1).save(q)
    result = runner.invoke(app, ["search", "--image", str(q), "--json"])
    assert result.exit_code == 3, result.output
    assert "IMGSYNC_MILVUS_URI" in result.output and uri in result.output
    assert "Traceback" not in result.output
    error = ErrorOutput.model_validate_json(result.stdout).error  # --json: the error is stdout's one document
    assert (error.kind, error.exit_status, error.setting) == ("unreachable", 3, "IMGSYNC_MILVUS_URI")
    assert uri in error.message


def test_index_json_without_wait_and_an_unreachable_broker(home: Path, tmp_path: Path) -> None:
    """`index --json` without --wait reports the request and what it queued; with a broker that does
    not answer it exits 3 naming IMGSYNC_BROKER_URL (password masked), no traceback, and stdout holds
    one JSON document: the error."""
    from tests.helpers import photo

    (tmp_path / "cat" / "S1").mkdir(parents=True)
    photo(64, 64, seed=5).save(tmp_path / "cat" / "S1" / "a.jpg")
    result = runner.invoke(app, ["index", str(tmp_path / "cat"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["queued"] == 1 and doc["results"] == [] and doc["request_id"]

    env = {**os.environ, "IMGSYNC_BROKER_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "index", str(tmp_path / "cat"), "--json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "IMGSYNC_BROKER_URL" in proc.stderr and "Traceback" not in proc.stderr
    assert "hunter2" not in proc.stderr and "hunter2" not in proc.stdout
    error = json.loads(proc.stdout)["error"]
    assert (error["kind"], error["exit_status"], error["setting"]) == ("unreachable", 3, "IMGSYNC_BROKER_URL")
    assert error["service"] == "broker" and "redis://:***@127.0.0.1" in error["message"]


def test_search_needs_exactly_one_query(home: Path) -> None:
    """search without a query, or with both kinds, is a usage error."""
    assert runner.invoke(app, ["search"]).exit_code == 2
    assert runner.invoke(app, ["search", "--image", "x.jpg", "--text", "shoe"]).exit_code == 2


def test_search_with_an_unreadable_image_is_exit_2_on_an_empty_index(home: Path) -> None:
    """A query image that cannot be read is a usage error naming it, even before anything is indexed
    (it used to answer "no hits", exit 0)."""
    result = runner.invoke(app, ["search", "--image", "/no/such/query.jpg", "--json"])
    assert result.exit_code == 2, result.output
    assert "/no/such/query.jpg" in result.stderr
    assert "/no/such/query.jpg" in ErrorOutput.model_validate_json(result.stdout).error.message


@pytest.mark.parametrize("args", [["failures", "list", "--json"], ["status", "--json"], ["index", ".", "--json"]])
def test_an_embedded_home_that_cannot_be_written_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    """IMGSYNC_HOME under a regular file, or a state database that cannot be opened (here a folder
    stands where the file should be): exit 2 naming IMGSYNC_HOME, no traceback (it was a raw
    NotADirectoryError, exit 1)."""
    monkeypatch.setenv("IMGSYNC_METRICS_PORT", "0")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path / "a-file" / "home"))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "IMGSYNC_HOME" in result.stderr and "Traceback" not in result.output
    assert "IMGSYNC_HOME" in ErrorOutput.model_validate_json(result.stdout).error.message
    (tmp_path / "home2" / "state.db").mkdir(parents=True)
    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path / "home2"))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "IMGSYNC_HOME" in result.output and "Traceback" not in result.output


def test_a_usage_error_under_json_is_one_error_document(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --json, a command stopped by a usage error (a path that is not there, a bad setting) still
    prints one JSON document on stdout, the error, and exits 2; the line on stderr says the same."""
    result = runner.invoke(app, ["index", "/no/such/folder", "--json"])
    assert result.exit_code == 2, result.output
    error = ErrorOutput.model_validate_json(result.stdout).error
    assert (error.kind, error.exit_status) == ("usage", 2) and "/no/such/folder" in error.message
    assert " ".join(error.message.split()) in " ".join(result.stderr.split())

    monkeypatch.setenv("IMGSYNC_BATCH_MAX", "zero")
    result = runner.invoke(app, ["failures", "list", "--json"])
    assert result.exit_code == 2, result.output
    assert "IMGSYNC_BATCH_MAX" in ErrorOutput.model_validate_json(result.stdout).error.message


def test_index_missing_path_is_exit_2(home: Path) -> None:
    """Indexing a path that does not exist is a usage error naming the path."""
    result = runner.invoke(app, ["index", "/no/such/folder", "--json"])
    assert result.exit_code == 2 and "/no/such/folder" in result.output


def test_index_refuses_what_it_cannot_read_as_usage_errors(home: Path) -> None:
    """An unsupported scheme or a file:// uri naming another host is a usage error saying so."""
    for target, words in (("ftp://host/S/d.jpg", "not supported"), ("file://fileserver/S/d.jpg", "local file")):
        result = runner.invoke(app, ["index", target, "--json"])
        assert result.exit_code == 2 and words in result.output, result.output


def test_index_lists_a_catalog_as_it_lies(tmp_path: Path) -> None:
    """A linked image is its own image in the SKU folder it lies in; a linked SKU folder is walked;
    a link back up the tree ends there; a file:// uri in imgsync's own percent-encoded form names
    its file."""
    from worker.cli.indexing import collect_events

    root = tmp_path / "cat"
    (root / "SKU-A").mkdir(parents=True)
    (root / "SKU-A" / "real.jpg").write_bytes(b"a")
    (root / "SKU-B").mkdir()
    (root / "SKU-B" / "alias.jpg").symlink_to("../SKU-A/real.jpg")
    (root / "SKU-A" / "up").symlink_to(root)  # a loop
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "c é.jpg").write_bytes(b"c")
    (root / "SKU-C").symlink_to(outside)
    events = {(e.uri, e.sku) for e in collect_events([str(root)], None)}
    assert events == {
        ((root / "SKU-A" / "real.jpg").as_uri(), "SKU-A"),
        ((root / "SKU-B" / "alias.jpg").as_uri(), "SKU-B"),
        ((root / "SKU-C" / "c é.jpg").as_uri(), "SKU-C"),
    }
    single = collect_events([(root / "SKU-B" / "alias.jpg").as_uri(), f"file://localhost{root}/SKU-C/c%20%C3%A9.jpg"], None)
    assert [(e.uri, e.sku) for e in single] == [
        ((root / "SKU-B" / "alias.jpg").as_uri(), "SKU-B"),
        ((root / "SKU-C" / "c é.jpg").as_uri(), "SKU-C"),
    ]


def test_index_takes_a_sku_folder_and_a_url_s_sku_as_a_person_reads_them(tmp_path: Path) -> None:
    """A SKU folder given itself gives its images its name (as one of its files does); a folder with
    images both loose and in SKU folders is refused; a URL's SKU is its percent-decoded folder, the
    same SKU the local file gets; an s3:// key is taken as it is."""
    from worker.cli.indexing import collect_events
    from worker.errors import ConfigError

    sku_dir = tmp_path / "cat" / "SKU ü 1"
    sku_dir.mkdir(parents=True)
    for name in ("a.jpg", "b.png"):
        (sku_dir / name).write_bytes(b"x")
    assert {e.sku for e in collect_events([str(sku_dir)], None)} == {"SKU ü 1"}
    assert {e.sku for e in collect_events([str(sku_dir / "a.jpg")], None)} == {"SKU ü 1"}
    assert {e.sku for e in collect_events([str(sku_dir)], "OTHER")} == {"OTHER"}
    (sku_dir / "nested").mkdir()
    (sku_dir / "nested" / "c.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="both directly and in SKU folders"):
        collect_events([str(sku_dir)], None)
    (url,) = collect_events(["https://cdn.example.com/img/SKU%20%C3%BC%201/my%20photo.jpg"], None)
    assert url.sku == "SKU ü 1"
    (key,) = collect_events(["s3://bucket/SKU%201/x.jpg"], None)
    assert key.sku == "SKU%201"


def test_status_of_a_database_without_schema_is_a_setup_error(
    home: Path, milvus_uri: str, pg_database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reachable PostgreSQL database that has no imgsync schema yet: `status --json` says not
    ready, names `imgsync db upgrade`, exit 2 (a setup step missing, as `index` says), not 3 (a
    service unreachable); after `db upgrade` it is ready."""
    monkeypatch.setenv("IMGSYNC_MILVUS_URI", milvus_uri)
    monkeypatch.setenv("IMGSYNC_DATABASE_URL", pg_database())
    result = runner.invoke(app, ["status", "--json"])
    doc = StatusOutput.model_validate_json(result.stdout)
    assert result.exit_code == 2 and not doc.ready and "imgsync db upgrade" in doc.errors[0], result.output
    assert runner.invoke(app, ["index", ".", "--json"]).exit_code == 2
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0 and StatusOutput.model_validate_json(result.stdout).ready, result.output


def test_status_json(home: Path, milvus_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """status --json is one valid document; ready when DB, broker and Milvus answer, exit 3 when not."""
    result = runner.invoke(app, ["status", "--json"])
    doc = StatusOutput.model_validate_json(result.stdout)
    assert result.exit_code == 3 and not doc.ready and doc.errors
    monkeypatch.setenv("IMGSYNC_MILVUS_URI", milvus_uri)
    result = runner.invoke(app, ["status", "--json"])
    doc = StatusOutput.model_validate_json(result.stdout)
    assert result.exit_code == 0 and doc.ready, doc.errors
    assert doc.milvus_uri == milvus_uri and doc.configured_model == "tiny"
    assert set(doc.queues) == {"preprocess", "encode", "sku"}
    assert doc.ledger == {"pending": 0, "indexed": 0, "failed": 0, "deleted": 0}


def test_demo_runs_and_prints_search(tmp_path: Path) -> None:
    """`imgsync demo` on a fresh home (no hub here) falls back to tiny with a notice, indexes the
    synthetic catalog, prints a search table, and stops its stack cleanly; then, with nothing
    running, `search` and `verify` serve the data it left (their own server loads the collections
    it finds released)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSYNC_")}
    env["IMGSYNC_HOME"] = str(tmp_path / "demo-home")
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--images", "24", "--skus", "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "24 indexed" in out
    assert "images nearest to a new photo of" in out and "nearest SKUs" in out
    assert "tiny" in out and "RANDOM WEIGHTS" in out
    assert "`IMGSYNC_MODEL=tiny imgsync up` serves it again" in out  # plain `up` checks the default model's weights
    assert not (tmp_path / "demo-home" / "milvus" / "server.json").exists()  # server stopped
    status = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    doc = json.loads(status.stdout)
    assert doc["ledger"]["indexed"] == 24

    photo_file = next((tmp_path / "demo-home" / "demo-catalog").rglob("*.jpg"))
    for args in (["--image", str(photo_file)], ["--image", str(photo_file), "--skus"], ["--text", "a red shoe"]):
        found = subprocess.run(
            [sys.executable, "-m", "worker.cli", "search", *args, "--limit", "3", "--json"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert found.returncode == 0, found.stderr[-3000:]
        hits = json.loads(found.stdout)["hits"]
        assert len(hits) == 3 and all(-1.0 <= h["score"] <= 1.0 for h in hits)  # a cosine, rounding included
        if args == ["--image", str(photo_file)]:  # the indexed photo itself comes first, as itself
            assert hits[0]["uri"] == photo_file.resolve().as_uri() and hits[0]["score"] > 0.999
        if "--skus" in args:
            assert hits[0]["sku"] == photo_file.parent.name
    checked = subprocess.run(
        [sys.executable, "-m", "worker.cli", "verify", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert json.loads(checked.stdout)["problems"] == 0

    # a smaller demo on the same home: the catalog and the index hold its 10 photos only
    again = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--images", "10", "--skus", "4"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "removed 14 photos of an earlier, larger demo" in again.stdout
    assert len(list((tmp_path / "demo-home" / "demo-catalog").rglob("*.jpg"))) == 10
    assert len(list((tmp_path / "demo-home" / "demo-catalog-queries").glob("*.jpg"))) == 4
    status = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert json.loads(status.stdout)["ledger"] == {"pending": 0, "indexed": 10, "failed": 0, "deleted": 14}
    checked = subprocess.run(
        [sys.executable, "-m", "worker.cli", "verify", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0 and json.loads(checked.stdout)["problems"] == 0, checked.stdout + checked.stderr[-3000:]


@pytest.mark.parametrize("args", [["up"], ["worker", "--queues", "encode"]])
def test_no_silent_fallback_when_weights_unavailable(tmp_path: Path, args: list[str]) -> None:
    """`up` and `worker` with the default pretrained model and no way to get its weights fail at once
    with exit 2 naming IMGSYNC_MODEL (only `demo` falls back to tiny)."""
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGSYNC_", "HF_"))}
    env.update(
        IMGSYNC_HOME=str(tmp_path / "home"),
        IMGSYNC_MILVUS_URI=f"http://127.0.0.1:{free_port()}",
        IMGSYNC_METRICS_PORT="0",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "IMGSYNC_MODEL=open_clip:ViT-B-32@openai" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("IMGSYNC_MODEL", "open_clip:NoSuchArch", "open_clip has no architecture 'NoSuchArch'"),
        ("IMGSYNC_DEVICE", "cuda", "no CUDA device is available"),
        ("IMGSYNC_MODEL", "open_clip:ViT-B-32@{garbage}", "cannot load weights"),  # found by the encode worker
    ],
    ids=["architecture", "device", "weights-file"],
)
def test_up_refuses_a_model_or_device_it_cannot_run_with_exit_2(tmp_path: Path, setting: str, value: str, says: str) -> None:
    """`imgsync up` with a model architecture that does not exist or CUDA asked for where there is
    none exits 2 at once, before any stack process starts; a weights file that cannot be read is
    found by the encode worker, and up then exits 2 with the worker's message (it exited 1, the
    reason only in the worker's log)."""
    if torch_cuda_available() and setting == "IMGSYNC_DEVICE":
        pytest.skip("CUDA is present here: the refusal of IMGSYNC_DEVICE=cuda needs a machine without it")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSYNC_")}
    env.update(IMGSYNC_HOME=str(tmp_path / "home"), IMGSYNC_METRICS_PORT="0", IMGSYNC_MODEL="tiny")
    env[setting] = value.format(garbage=garbage)
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "up"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr, proc.stderr
    if "{garbage}" not in value:  # refused before the stack: no Milvus server was started
        assert not (tmp_path / "home" / "milvus").exists()


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_wait_without_workers_hints_and_times_out(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`index --wait` with no worker running: a hint on stderr, then after --timeout exit 1 with the
    images reported as pending (nothing claimed as indexed)."""
    from tests.helpers import photo
    from worker.cli import indexing

    monkeypatch.setattr(indexing, "STALL_HINT_SECONDS", 0.3)
    (tmp_path / "cat" / "S1").mkdir(parents=True)
    photo(64, 64, seed=2).save(tmp_path / "cat" / "S1" / "a.jpg")
    result = runner.invoke(app, ["index", str(tmp_path / "cat"), "--wait", "--json", "--timeout", "1.5"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert [r["outcome"] for r in doc["results"]] == ["pending"]
    assert doc["results"][0]["sku"] == "S1"
    assert "are workers running" in result.stderr


def test_failures_options_validated(home: Path) -> None:
    """`failures list` refuses an unknown reason or time filter (exit 2) and is empty on a new ledger."""
    assert runner.invoke(app, ["failures", "list", "--reason", "nope"]).exit_code == 2
    transient = runner.invoke(app, ["failures", "list", "--reason", "fetch_error"])  # no failed image ends with it
    assert transient.exit_code == 2 and "retries_exhausted" in transient.output, transient.output
    assert runner.invoke(app, ["failures", "list", "--reason", "fetch_timeout"]).exit_code == 0
    assert runner.invoke(app, ["failures", "list", "--since", "yesterday"]).exit_code == 2
    result = runner.invoke(app, ["failures", "list", "--since", "7d", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == {"failures": [], "by_reason": {}}


def test_human_output_shows_user_data_verbatim(home: Path, tmp_path: Path) -> None:
    """SKUs with rich-markup-like brackets are printed as they are, not eaten as markup."""
    from tests.helpers import photo

    folder = tmp_path / "cat" / "[red]SKU"
    folder.mkdir(parents=True)
    photo(64, 64, seed=4).save(folder / "[b]x.jpg")
    result = runner.invoke(app, ["index", str(tmp_path / "cat"), "--wait", "--timeout", "0.5"], env={"COLUMNS": "300"})
    assert result.exit_code == 1  # no workers: pending
    assert "[red]SKU" in result.stdout  # rich would have swallowed "[red]" as a style


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem (tmpfs) to fill up; skipped where this process may not mount one."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> None:
    import shutil

    with open(mnt / "filler", "wb") as f:
        try:
            while shutil.disk_usage(mnt).free > 0:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass  # full


def test_a_full_disk_under_imgsync_home_is_said_not_a_traceback(full_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded IMGSYNC_HOME on a real filesystem that runs full: `index` exits 3 with one line that
    names the state database and the free space under IMGSYNC_HOME (it was a raw sqlite traceback,
    exit 1), its --json error document says the same, and `status` lists the full disk."""
    from tests.helpers import photo

    monkeypatch.setenv("IMGSYNC_HOME", str(full_disk / "home"))
    monkeypatch.setenv("IMGSYNC_MODEL", "tiny")
    monkeypatch.setenv("IMGSYNC_METRICS_PORT", "0")
    (tmp_path / "cat" / "S1").mkdir(parents=True)
    photo(64, 64, seed=7).save(tmp_path / "cat" / "S1" / "a.jpg")
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    _fill(full_disk)

    result = runner.invoke(app, ["index", str(tmp_path / "cat"), "--json"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    error = ErrorOutput.model_validate_json(result.stdout).error
    assert error.setting in ("IMGSYNC_DATABASE_URL", "IMGSYNC_BROKER_URL", "IMGSYNC_HOME"), error
    assert "full" in error.message and f"IMGSYNC_HOME ({full_disk / 'home'}) has 0.0 MiB free" in error.message

    doc = StatusOutput.model_validate_json(runner.invoke(app, ["status", "--json"]).stdout)
    assert any(e.startswith(f"IMGSYNC_HOME ({full_disk / 'home'})") for e in doc.errors), doc.errors
