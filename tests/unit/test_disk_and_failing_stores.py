"""A full disk under IMGSYNC_HOME and a state database that fails mid-command: said in plain words
(status, `index --wait`'s stall hint, `up`, the CLI's error line), never a raw traceback."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from config.settings import Settings
from worker.cli.common import State, handle_errors
from worker.ledger.db import safe_url
from worker.status import disk_problem

runner = CliRunner()


def test_disk_problem_names_imgsync_home_when_its_disk_is_low(tmp_path: Path) -> None:
    """The embedded stack keeps its data under IMGSYNC_HOME: under ``low`` bytes free there is a
    problem named with the path; a home not made yet is measured on the filesystem it will be on."""
    home = tmp_path / "not" / "made" / "yet"
    settings = Settings(home=home)
    said = disk_problem(settings, low=2**62)
    assert said is not None and str(home) in said and "IMGSYNC_HOME" in said and "MiB free" in said
    assert disk_problem(settings, low=0) is None


def test_a_production_stack_keeps_nothing_under_imgsync_home(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        broker_url="redis://127.0.0.1:6379/0",
        database_url="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        milvus_uri="http://127.0.0.1:19530",
    )
    assert disk_problem(settings, low=2**62) is None
    # a production stack whose pixel store is the default directory still writes there
    settings = Settings(
        home=tmp_path,
        broker_url="amqp://guest:guest@127.0.0.1:5672//",
        database_url="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        milvus_uri="http://127.0.0.1:19530",
    )
    assert disk_problem(settings, low=2**62) is not None


def test_safe_url_masks_a_url_sqlalchemy_cannot_parse() -> None:
    """The embedded broker's URL (``imgsync-sqlite://``) made the broker-unreachable error itself
    crash (sqlalchemy ArgumentError), so a full disk at publish time showed a traceback."""
    assert safe_url("imgsync-sqlite:///tmp/h/broker.db") == "imgsync-sqlite:///tmp/h/broker.db"
    assert safe_url("weird-scheme://user:hunter2@host/x") == "weird-scheme://user:***@host/x"
    assert safe_url("redis://:hunter2@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    # kombu's failover lists: each URL masked (one crashed the error path, the other leaked pw2 encoded)
    assert safe_url("redis://:pw1@127.0.0.1:1;redis://:pw2@127.0.0.1:2") == "redis://:***@127.0.0.1:1;redis://:***@127.0.0.1:2"
    masked = safe_url("redis://:pw1@127.0.0.1:1/0;redis://:pw2@127.0.0.1:2/0")
    assert "pw1" not in masked and "pw2" not in masked and masked.count(";") == 1


def _app(fault: Exception) -> typer.Typer:
    """A one-command app whose command fails with ``fault`` (fault injection: the real wrapper)."""
    app = typer.Typer()

    @app.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = State()

    @app.command()
    @handle_errors
    def run(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
        raise fault

    return app


def test_a_write_refused_for_lack_of_space_is_exit_3_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path))
    fault = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "pixels" / "x.px"))
    result = runner.invoke(_app(fault), ["run", "--json"])
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert (error["kind"], error["service"], error["setting"]) == ("unreachable", "disk", "IMGSYNC_HOME")
    assert "disk full at" in error["message"] and "x.px" in error["message"] and "Traceback" not in result.output


def test_a_full_disk_elsewhere_is_not_blamed_on_imgsync_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path / "home"))
    fault = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "elsewhere" / "catalog" / "x.jpg"))
    result = runner.invoke(_app(fault), ["run", "--json"])
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert error["setting"] is None and error["message"].startswith(f"disk full at {tmp_path / 'elsewhere'}")
    assert "IMGSYNC_HOME" not in error["message"].split(":")[0]


def test_a_state_database_failing_mid_command_is_exit_3_naming_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import sqlalchemy as sa

    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path))
    fault = sa.exc.OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))
    result = runner.invoke(_app(fault), ["run"])
    assert result.exit_code == 3 and "Traceback" not in result.output, result.output
    line = " ".join(result.stderr.split())
    assert "database failing at sqlite:///" in line and "(IMGSYNC_DATABASE_URL): database or disk is full" in line


def test_a_low_disk_adds_its_line_to_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import sqlalchemy as sa

    import worker.status

    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path))
    monkeypatch.setattr(worker.status, "LOW_DISK_BYTES", 2**62)  # every disk is "low": the hint shows
    fault = sa.exc.OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))
    result = runner.invoke(_app(fault), ["run", "--json"])
    assert result.exit_code == 3
    assert f"IMGSYNC_HOME ({tmp_path}) has" in json.loads(result.stdout)["error"]["message"]


def test_an_unexpected_error_is_still_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a service's or the disk's faults are turned into exit 3: a bug stays visible."""
    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path))
    result = runner.invoke(_app(OSError(errno.EACCES, "Permission denied")), ["run"])
    assert result.exit_code == 1 and isinstance(result.exception, PermissionError)


def test_up_says_a_low_disk_once_and_when_it_has_room_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import worker.status
    from worker.cli.main import _say_disk

    settings = Settings(home=tmp_path)
    monkeypatch.setattr(worker.status, "LOW_DISK_BYTES", 2**62)
    said = _say_disk(settings, None)
    assert said is not None and _say_disk(settings, said) == said
    monkeypatch.setattr(worker.status, "LOW_DISK_BYTES", 0)
    assert _say_disk(settings, said) is None
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("warning: IMGSYNC_HOME") == 1 and "has room again" in err


def test_status_masks_every_password_of_a_failover_broker_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """status showed the second URL of a `;` failover list with its password in clear."""
    from worker.index.lite_server import free_port
    from worker.status import collect_status

    urls = f"redis://:pw1@127.0.0.1:{free_port()}/0;redis://:pw2secret@127.0.0.1:{free_port()}/0"
    doc = collect_status(Settings(home=tmp_path, broker_url=urls, milvus_uri=f"http://127.0.0.1:{free_port()}"))
    assert "pw1" not in doc.broker_url and "pw2secret" not in doc.broker_url
    assert doc.broker_url.count(":***@") == 2 and not doc.ready
    assert doc.errors and not any("pw1" in e or "pw2secret" in e for e in doc.errors), doc.errors


def test_a_state_file_another_process_keeps_locked_is_exit_3(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the embedded state.db's write lock past the wait: sqlite3's own
    OperationalError (raised by BEGIN IMMEDIATE, not wrapped by SQLAlchemy) was a traceback, exit 1.
    Now exit 3 naming the database, with the JSON error document."""
    import sqlite3

    from schemas.outputs import ErrorOutput
    from worker.cli.main import app
    from worker.ledger import db as ledger_db

    assert CliRunner().invoke(app, ["failures", "list", "--json"]).exit_code == 0  # the state exists
    monkeypatch.setattr(ledger_db.begin_immediate, "__defaults__", (300,))  # wait 0.3 s, not 30 s
    holder = sqlite3.connect(home / "state.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = CliRunner().invoke(app, ["failures", "list", "--json"])
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == 3, result.output
    error = ErrorOutput.model_validate_json(result.stdout).error
    assert error.service == "database" and "locked" in error.message
