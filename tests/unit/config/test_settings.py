"""Settings: one source, documented precedence, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import DEFAULT_MODEL, Settings


def test_defaults_serve_embedded_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set, broker, state DB and Milvus all live under IMGSYNC_HOME (./.imgsync)."""
    monkeypatch.chdir(tmp_path)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.home == (tmp_path / ".imgsync").resolve()
    assert s.effective_broker_url == f"imgsync-sqlite://{s.home / 'broker.db'}"
    assert s.effective_database_url == f"sqlite:///{s.home / 'state.db'}"
    assert s.effective_catalog_url == s.effective_database_url
    assert s.embedded_broker and s.milvus_uri == ""
    assert s.model == DEFAULT_MODEL


def test_env_overrides_dotenv_and_kwargs_override_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Precedence: keyword > environment > .env > default."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("IMGSYNC_BATCH_MAX=7\nIMGSYNC_MODEL=tiny\nIMGSYNC_DEVICE=cpu\n")
    monkeypatch.setenv("IMGSYNC_BATCH_MAX", "9")
    s = Settings()
    assert s.batch_max == 9  # env beats .env
    assert s.model == "tiny"  # .env beats default
    assert Settings(batch_max=3).batch_max == 3  # keyword beats env


def test_dotenv_shared_with_compose_keeps_only_imgsync_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .env that also holds other services' variables (docker compose reads the same file) loads its
    IMGSYNC_* keys and leaves the others alone; an unknown IMGSYNC_* key is still refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=secret\nMINIO_ROOT_USER=minio\nIMGSYNC_BATCH_MAX=7\n")
    assert Settings().batch_max == 7  # type: ignore[call-arg]
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=secret\nIMGSYNC_BATCH_MAXX=7\n")
    with pytest.raises(ValidationError, match="imgsync_batch_maxx"):
        Settings()  # type: ignore[call-arg]


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-range value is refused with the setting's name."""
    monkeypatch.setenv("IMGSYNC_BATCH_MAX", "0")
    with pytest.raises(ValidationError, match="batch_max"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_unknown_setting_is_refused() -> None:
    """Unknown keyword settings are an error, never silently ignored."""
    with pytest.raises(ValidationError, match="batch_maxx"):
        Settings(_env_file=None, batch_maxx=3)  # type: ignore[call-arg]


def test_file_roots_comma_separated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """IMGSYNC_FILE_ROOTS takes a comma-separated list of folders."""
    monkeypatch.setenv("IMGSYNC_FILE_ROOTS", f"{tmp_path}/a, {tmp_path}/b")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.fetch.file_roots == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())


def test_as_env_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings handed to a child process as IMGSYNC_* variables come back equal."""
    s = Settings(_env_file=None, home=tmp_path, model="tiny", batch_max=5, file_roots=[tmp_path])  # type: ignore[call-arg]
    for k, v in s.as_env().items():
        monkeypatch.setenv(k, v)
    assert Settings(_env_file=None) == s  # type: ignore[call-arg]


def test_sub_configs_are_frozen(make_settings) -> None:
    """Sub-systems get frozen views of the settings."""
    s = make_settings(batch_wait_ms=250)
    assert s.batching.wait_seconds == 0.25
    with pytest.raises(AttributeError):
        s.batching.max_size = 1  # type: ignore[misc]
