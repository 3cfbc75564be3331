"""The state schema's life on a real PostgreSQL (and SQLite): upgrades run at once, a history this
code does not know (a newer imgsync, another application's alembic), another application's tables,
a role without the privileges, and the settings that would put data where it was not meant to go."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from typer.testing import CliRunner

from config.settings import Settings
from schemas.outputs import ErrorOutput
from tests.conftest import PG_ADMIN_DSN
from worker.cli.main import app
from worker.errors import ConfigError
from worker.ledger import make_engine, upgrade
from worker.ledger.db import current_revision, head_revision
from worker.sources.catalog_db import upgrade_catalog

runner = CliRunner()


def _sql(url: str, *statements: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    engine.dispose()


def test_upgrades_run_at_once_take_turns(pg_database) -> None:
    """Three `db upgrade` at once on an empty database: each ends at head (without a lock of its own,
    two created alembic_version together and one failed with a duplicate key)."""
    url = pg_database()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(url)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and current_revision(url) == head_revision()


def test_a_history_this_code_does_not_know_is_a_usage_error(pg_database, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A state database a newer imgsync upgraded (or another application's alembic history): every
    command said "run `imgsync db upgrade`", which then crashed with alembic's CommandError. Now both
    say what it is, exit 2."""
    url = pg_database()
    upgrade(url)
    _sql(url, "UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(ConfigError, match="does not know"):
        upgrade(url)
    monkeypatch.setenv("IMGSYNC_DATABASE_URL", url)
    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path / "home"))
    for args in (["db", "upgrade"], ["failures", "list", "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "'0099'" in result.output and "Traceback" not in result.output, result.output
    error = ErrorOutput.model_validate_json(runner.invoke(app, ["failures", "list", "--json"]).stdout).error
    assert error.kind == "usage" and "newer imgsync" in error.message


def test_a_newer_embedded_state_file_is_a_usage_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The embedded state.db left by a newer imgsync: exit 2 with the JSON error document (exit 1,
    a traceback, and no JSON)."""
    home = tmp_path / "home"
    monkeypatch.setenv("IMGSYNC_HOME", str(home))
    url = Settings(_env_file=None).effective_database_url  # type: ignore[call-arg]
    upgrade(url)
    _sql(url, "UPDATE alembic_version SET version_num = '0099'")
    result = runner.invoke(app, ["failures", "list", "--json"])
    assert result.exit_code == 2, result.output
    assert "'0099'" in ErrorOutput.model_validate_json(result.stdout).error.message


def test_another_applications_tables_are_not_taken_over(pg_database) -> None:
    """A database holding another application's `images` table (the catalog defaults to the state
    database): refused naming it (the upgrade failed with DuplicateTable)."""
    url = pg_database()
    _sql(url, "CREATE TABLE images (id serial primary key, path text)")
    with pytest.raises(ConfigError, match="images.*another application"):
        upgrade(url)
    assert current_revision(url) is None


def test_a_role_without_create_is_told_which_grant_is_missing(pg_database) -> None:
    """A role that may not create tables in the schema (PostgreSQL 15's default for non-owners):
    exit 2 naming the grant (a traceback, exit 1)."""
    url = pg_database()
    role = f"imgsync_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
    _sql(url, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    try:
        as_role = sa.engine.make_url(url).set(username=role, password=None).render_as_string(hide_password=False)
        with pytest.raises(ConfigError, match="grant"):
            upgrade(as_role)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP ROLE "{role}"')


def test_a_catalog_history_this_code_does_not_know_is_a_usage_error(pg_database) -> None:
    url = pg_database()
    upgrade_catalog(url)
    _sql(url, "UPDATE alembic_version_catalog SET version_num = 'c0099'")
    with pytest.raises(ConfigError, match="'c0099'.*does not know"):
        upgrade_catalog(url)


def test_the_outbox_listener_passes_url_options_as_the_engine_does(pg_database) -> None:
    """`?options=-c%20statement_timeout%3D60000` on the catalog URL: the LISTEN connection rendered the
    URL again (a space became '+'), the server refused it, and the relay polled for ever."""
    from worker.sources.outbox import _Listener

    url = pg_database() + "?options=-c%20statement_timeout%3D60000"
    listener = _Listener(url)
    listener.open()
    try:
        assert listener.conn is not None
        assert listener.conn.execute("SHOW statement_timeout").fetchone()[0] == "1min"
    finally:
        listener.close()


def test_sources_outbox_checks_the_state_schema_before_writing_the_catalog(pg_database, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Against a state database never upgraded it created the catalog tables, then exited 2."""
    url = pg_database()
    monkeypatch.setenv("IMGSYNC_DATABASE_URL", url)
    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["sources", "outbox", "--once"])
    assert result.exit_code == 2 and "db upgrade" in result.output, result.output
    assert sa.inspect(make_engine(url)).get_table_names() == []


@pytest.mark.parametrize("name", ["q?mark", "pct%41", "hash#1"])
def test_a_home_a_sqlite_url_cannot_hold_is_refused(tmp_path: Path, name: str) -> None:
    """`?` ended the state URL there (the ledger went to a sibling file), `%41` decoded to `A`."""
    with pytest.raises(ValidationError, match="SQLite URL cannot hold"):
        Settings(_env_file=None, home=tmp_path / name)  # type: ignore[call-arg]


def test_an_unencoded_at_in_a_database_password_is_refused_without_showing_it(tmp_path: Path) -> None:
    """`p@Ssw0rdTail` unencoded: errors printed `Ssw0rdTail@127.0.0.1` as the host."""
    with pytest.raises(ConfigError, match="%40") as info:
        Settings(_env_file=None, home=tmp_path, database_url="postgresql+psycopg://u:p@Ssw0rdTail@127.0.0.1/db")  # type: ignore[call-arg]
    assert "Ssw0rdTail" not in str(info.value)


@pytest.mark.parametrize("command", [["up"], ["demo", "--images", "4", "--skus", "2"]])
def test_up_and_demo_leave_a_database_of_its_own_to_db_upgrade(pg_database, tmp_path: Path, monkeypatch, command: list) -> None:  # type: ignore[no-untyped-def]
    """With IMGSYNC_DATABASE_URL set, `up` and `demo` upgraded that database without being asked; a
    production database is upgraded on purpose (`imgsync db upgrade`), as every other command says."""
    url = pg_database()
    monkeypatch.setenv("IMGSYNC_DATABASE_URL", url)
    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMGSYNC_MODEL", "tiny")
    monkeypatch.setenv("IMGSYNC_METRICS_PORT", "0")
    result = runner.invoke(app, command)
    assert result.exit_code == 2 and "db upgrade" in result.output, result.output
    assert current_revision(url) is None
