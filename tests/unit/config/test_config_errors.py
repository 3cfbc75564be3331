"""Malformed settings are refused when the settings are built: a ConfigError (or ValidationError) that
names the setting, masks passwords, and gives the CLI exit status 2 for every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import Settings
from worker.encoders import parse_spec
from worker.encoders.base import ModelSpec
from worker.errors import ConfigError


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(_env_file=None, home=tmp_path, model="tiny", **values)  # type: ignore[call-arg]


# --- database URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "setting"), [("database_url", "IMGSYNC_DATABASE_URL"), ("catalog_url", "IMGSYNC_CATALOG_URL")])
def test_unparseable_database_url_names_the_setting(tmp_path: Path, field: str, setting: str) -> None:
    """A database or catalog URL SQLAlchemy cannot parse is a ConfigError naming its setting."""
    with pytest.raises(ConfigError, match=f"{setting}='notaurl' is not a SQLAlchemy URL"):
        _settings(tmp_path, **{field: "notaurl"})


def test_unparseable_database_url_message_masks_the_password(tmp_path: Path) -> None:
    """The message about a URL that does not parse shows its password as ***."""
    with pytest.raises(ConfigError, match="IMGSYNC_DATABASE_URL") as err:
        _settings(tmp_path, database_url="postgresql://u:s3cret@host:notaport/db")
    assert "s3cret" not in str(err.value) and "u:***@host" in str(err.value)


def test_unknown_database_dialect_is_a_config_error(tmp_path: Path) -> None:
    """A URL of a dialect SQLAlchemy does not know is a ConfigError naming the dialect."""
    with pytest.raises(ConfigError, match="IMGSYNC_DATABASE_URL=.*unknown database dialect 'nosuchdb'"):
        _settings(tmp_path, database_url="nosuchdb://u@127.0.0.1/x")


def test_missing_database_driver_is_a_config_error_with_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL whose DBAPI driver is not installed is a ConfigError with a pip hint, password masked."""
    monkeypatch.setitem(sys.modules, "MySQLdb", None)  # makes `import MySQLdb` fail here, installed or not
    with pytest.raises(ConfigError, match="IMGSYNC_DATABASE_URL") as err:
        _settings(tmp_path, database_url="mysql://u:s3cret@127.0.0.1/x")
    assert "'mysqldb' is not installed" in str(err.value) and "pip install mysqlclient" in str(err.value)
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize("url", ["", "sqlite:////tmp/imgsync/state.db", "postgresql+psycopg://u:p@db.example:5432/imgsync"])
def test_valid_database_urls_are_accepted(tmp_path: Path, url: str) -> None:
    """Empty (embedded), SQLite and PostgreSQL-with-psycopg URLs pass; no connection is attempted."""
    assert _settings(tmp_path, database_url=url, catalog_url=url).database_url == url


# --- broker URL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["bogus://x", "localhost:6379", "redis://a:6379/0;bogus://b"])
def test_unknown_broker_scheme_names_setting_and_valid_schemes(tmp_path: Path, url: str) -> None:
    """A broker URL without a kombu transport's scheme is a ConfigError listing the valid schemes."""
    with pytest.raises(ConfigError, match="IMGSYNC_BROKER_URL") as err:
        _settings(tmp_path, broker_url=url)
    assert all(scheme in str(err.value) for scheme in ("redis", "rediss", "amqp", "sqla", "imgsync-sqlite"))


def test_broker_url_message_masks_the_password(tmp_path: Path) -> None:
    """The message about a bad broker URL shows its password as ***."""
    with pytest.raises(ConfigError, match="IMGSYNC_BROKER_URL") as err:
        _settings(tmp_path, broker_url="bogus://user:s3cret@host:1234/0")
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://:pw@cache.example:6380/0",
        "amqp://guest:guest@127.0.0.1:5672//",
        "sqla+sqlite:////tmp/broker.db",
        "imgsync-sqlite:////tmp/broker.db",
        "redis://a:6379/0;redis://b:6379/0",
    ],
)
def test_known_broker_schemes_are_accepted(tmp_path: Path, url: str) -> None:
    """Broker URLs of kombu's transports and of imgsync's embedded one pass."""
    assert _settings(tmp_path, broker_url=url).broker_url == url


# --- Milvus URI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["notaurl", "ftp://milvus:19530", "http://", "http://milvus:notaport", "http://[::1"])
def test_bad_milvus_uri_is_a_config_error(tmp_path: Path, uri: str) -> None:
    """A Milvus URI pymilvus would refuse is a ConfigError naming IMGSYNC_MILVUS_URI and the valid forms."""
    with pytest.raises(ConfigError, match="IMGSYNC_MILVUS_URI=.* is not a Milvus URI: use http"):
        _settings(tmp_path, milvus_uri=uri)


@pytest.mark.parametrize(
    "uri", ["http://127.0.0.1:19530", "https://x.example.com", "tcp://milvus:19530", "unix:/tmp/milvus.sock", "milvus.db"]
)
def test_valid_milvus_uris_are_accepted(tmp_path: Path, uri: str) -> None:
    """http(s)://, tcp:// with a host, unix: sockets and local .db files pass."""
    assert _settings(tmp_path, milvus_uri=uri).milvus_uri == uri


# --- device --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["banana", "gpu", "cuda:x", "cuda:"])
def test_unknown_device_is_refused(tmp_path: Path, device: str) -> None:
    """An IMGSYNC_DEVICE that is not auto, cpu, cuda or cuda:N is refused when the settings are built."""
    with pytest.raises(ValidationError, match="device"):
        _settings(tmp_path, device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "CUDA:0", " cpu "])
def test_device_forms_the_encoders_accept_pass(tmp_path: Path, device: str) -> None:
    """Every form resolve_device takes passes (whether the device exists is checked at model load)."""
    assert _settings(tmp_path, device=device).device == device


# --- model spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["tiny:foo", "tiny:foo@bar", "tiny:imgsync-tiny"])
def test_tiny_with_a_name_is_refused(text: str) -> None:
    """tiny takes no name: tiny:<name>[@w] is a ConfigError naming the valid form."""
    with pytest.raises(ConfigError, match=r"IMGSYNC_MODEL=.*takes no name; write tiny \(or tiny@"):
        parse_spec(text)


@pytest.mark.parametrize("text", ["random:16@w", "random:x", "random:1", "random:4097", "random:-8"])
def test_random_must_be_a_dimension_without_weights(text: str) -> None:
    """random takes a dimension and no @weights: anything else is a ConfigError naming random:<dim>."""
    with pytest.raises(ConfigError, match="IMGSYNC_MODEL=.*random:<dim>"):
        parse_spec(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tiny@/models/tiny.pt", ModelSpec("tiny", "imgsync-tiny", "/models/tiny.pt")),
        ("random:2", ModelSpec("random", "2", None)),
        ("random:4096", ModelSpec("random", "4096", None)),
    ],
)
def test_tiny_weights_and_random_dims_stay_valid(text: str, expected: ModelSpec) -> None:
    """tiny@<weights file> and random:<dim> within 2..4096 still parse."""
    assert parse_spec(text) == expected


# --- the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "args"),
    [
        ("IMGSYNC_DATABASE_URL", "notaurl", ["status"]),
        ("IMGSYNC_CATALOG_URL", "postgresql://u:s3cret@host:notaport/db", ["status", "--json"]),
        ("IMGSYNC_BROKER_URL", "bogus://x", ["index", "photo.jpg", "--force"]),
        ("IMGSYNC_MILVUS_URI", "notaurl", ["search", "--text", "x", "--json"]),
        ("IMGSYNC_DEVICE", "banana", ["status", "--json"]),
        ("IMGSYNC_MODEL", "tiny:foo", ["search", "--text", "x"]),
    ],
)
def test_cli_exits_2_naming_the_setting(tmp_path: Path, setting: str, value: str, args: list[str]) -> None:
    """The real CLI refuses a malformed setting with exit status 2, the setting on stderr; on stdout
    nothing, or with --json the error as its one JSON document."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSYNC_")}
    env.update({"IMGSYNC_HOME": str(tmp_path / "home"), "IMGSYNC_MODEL": "tiny", "IMGSYNC_METRICS_PORT": "0", setting: value})
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    if "--json" in args:
        error = json.loads(proc.stdout)["error"]
        assert (error["kind"], error["exit_status"]) == ("usage", 2) and setting in error["message"]
    else:
        assert proc.stdout == ""
    assert setting in proc.stderr and "Traceback" not in proc.stderr
    assert "s3cret" not in proc.stderr and "s3cret" not in proc.stdout


def test_fetch_allow_hosts_entries_are_checked_and_normalised(tmp_path: Path) -> None:
    """IMGSYNC_FETCH_ALLOW_HOSTS takes host names (xn-- form), addresses (also [IPv6]) and CIDRs;
    anything else is refused naming the entry (a bracketed IPv6 or a URL used to match nothing)."""
    settings = Settings(_env_file=None, home=tmp_path, fetch_allow_hosts="[::1], 10.0.0.0/8, Bücher.Example, intranet")
    assert settings.fetch_allow_hosts == ["::1/128", "10.0.0.0/8", "xn--bcher-kva.example", "intranet"]
    for bad in ("http://intranet/", "10.0.0.0/33", "a b"):
        with pytest.raises(ValidationError, match="neither a host name"):
            Settings(_env_file=None, home=tmp_path, fetch_allow_hosts=bad)


def test_fetch_ca_bundle_must_be_a_file(tmp_path: Path) -> None:
    """IMGSYNC_FETCH_CA_BUNDLE names a PEM file; a path that is not one is refused at once."""
    with pytest.raises(ValidationError, match="not a file"):
        Settings(_env_file=None, home=tmp_path, fetch_ca_bundle=str(tmp_path / "nope.pem"))
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    assert Settings(_env_file=None, home=tmp_path, fetch_ca_bundle=str(pem)).fetch.ca_bundle == str(pem.resolve())
    assert Settings(_env_file=None, home=tmp_path, fetch_ca_bundle="").fetch.ca_bundle == ""
