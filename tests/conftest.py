"""Shared fixtures. Services (PostgreSQL, Redis, Milvus Lite server) are real; a missing one fails
the test run instead of skipping it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.settings import Settings
from tests.helpers import photo

#: PostgreSQL of this machine and CI (trust auth); override with IMGSYNC_TEST_PG.
PG_ADMIN_DSN = os.environ.get("IMGSYNC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("IMGSYNC_TEST_REDIS", "redis://127.0.0.1:6379/15")
RABBITMQ_URL = os.environ.get("IMGSYNC_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No IMGSYNC_* from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("IMGSYNC_") and not key.startswith("IMGSYNC_TEST_"):
            monkeypatch.delenv(key)


@pytest.fixture
def make_settings(tmp_path: Path):
    """Settings for an embedded home under tmp_path (no .env file)."""

    def _make(**overrides: object) -> Settings:
        values: dict[str, object] = {"home": tmp_path / "home", "model": "tiny"}
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return _make


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An embedded IMGSYNC_HOME under tmp_path for in-process CLI runs (tiny model, no exporter bound
    inside the test process), with tmp_path as the working directory."""
    monkeypatch.setenv("IMGSYNC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMGSYNC_MODEL", "tiny")
    monkeypatch.setenv("IMGSYNC_METRICS_PORT", "0")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


@pytest.fixture(scope="session")
def pg_database() -> Iterator:
    """Factory of fresh PostgreSQL databases (dropped at the end of the session)."""
    import psycopg

    created: list[str] = []
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)

    def _create() -> str:
        name = f"imgsync_test_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"{base}/{name}"

    yield _create
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(pg_database) -> str:
    """A PostgreSQL database shared by the session's ledger tests."""
    return pg_database()


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Milvus Lite server shared by the session (tests use their own model ids / names)."""
    from worker.index import LiteServer

    server = LiteServer(tmp_path_factory.mktemp("milvus-session") / "milvus")
    server.start()
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def tiny_encoder():
    from worker.encoders import create_encoder

    return create_encoder("tiny").load()


@pytest.fixture
def catalog(tmp_path: Path):
    """Write a catalog ``<root>/<sku>/<n>.jpg``: ``n_skus`` SKUs × ``per_sku`` images of varied sizes."""

    def _make(n_skus: int = 5, per_sku: int = 4, root: Path | None = None) -> Path:
        root = root or tmp_path / "catalog"
        sizes = [(320, 240), (240, 320), (500, 500), (97, 211), (640, 180), (150, 150)]
        k = 0
        for s in range(n_skus):
            for i in range(per_sku):
                w, h = sizes[k % len(sizes)]
                path = root / f"SKU-{s + 1}" / f"{i + 1}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                photo(w, h, seed=1000 * s + i).save(path, quality=90)
                k += 1
        return root

    return _make


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto S3 server on a free local port, shared by the session: its endpoint url.

    Fails (never skips) when the server does not answer within 30 s.
    """
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from worker.index.lite_server import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30.0
        while True:
            if proc.poll() is not None:
                log_tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"moto server exited with {proc.returncode}: {log_tail}")
            try:
                with urllib.request.urlopen(endpoint + "/", timeout=1.0):
                    break
            except urllib.error.HTTPError:
                break  # any HTTP answer means the server is up
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server at {endpoint} did not answer within 30 s: "
                                f"{log_path.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
