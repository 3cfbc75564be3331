"""``imgsync reindex`` at its edges, on a real embedded (SQLite) ledger and PostgreSQL: a scope that
matches nothing, and the dry run's estimate after indexing that came in bursts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from config.settings import Settings
from schemas.events import ImageEvent
from tests.helpers import empty_ledger
from worker.cli.main import app
from worker.ledger import IndexedImage, Ledger
from worker.ledger.tables import images

runner = CliRunner()

#: two bursts 4 minutes apart: 7 images over 6 s, then 6 images over 5 s (13 images in 11 s of work)
BURSTS = ((0.0, 7), (6.0 + 240.0, 6))
BURST_RATE = 13 / 11


def index_in_bursts(ledger: Ledger, end: datetime) -> None:
    """Record the images of ``BURSTS`` as indexed, one a second within a burst, the last at ``end``."""
    stamps: list[float] = [at + i for at, n in BURSTS for i in range(n)]
    start = end - timedelta(seconds=stamps[-1])
    events = [ImageEvent(uri=f"s3://b/SKU-{i % 2}/{i}.jpg", sku=f"SKU-{i % 2}", version=10) for i in range(len(stamps))]
    ledger.accept_many(events, "r")
    ledger.mark_indexed([IndexedImage(e.image_id, e.version, "h", "model-a", "r") for e in events])
    with ledger.engine.begin() as conn:
        for e, s in zip(events, stamps, strict=True):
            conn.execute(
                images.update().where(images.c.image_id == e.image_id).values(indexed_at=start + timedelta(seconds=s))
            )


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_indexing_rate_leaves_out_idle_gaps_between_bursts(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two bursts 4 minutes apart: the rate is the images over the bursts' working time, not over the gap."""
    url = f"sqlite:///{tmp_path / 'state.db'}" if database == "sqlite" else request.getfixturevalue("pg_url")
    ledger = empty_ledger(url)
    now = datetime.now(UTC)
    index_in_bursts(ledger, now - timedelta(minutes=10))
    assert ledger.indexing_rate(now - timedelta(hours=1)) == pytest.approx(BURST_RATE)
    ledger.engine.dispose()


def test_the_dry_run_estimates_from_the_bursts_not_the_idle_time(home: Path) -> None:
    """`reindex --dry-run --json`: 13 images at the bursts' 13/11 images/s are estimated at 11 s."""
    ledger = empty_ledger(Settings(_env_file=None).effective_database_url)  # type: ignore[call-arg]
    index_in_bursts(ledger, datetime.now(UTC) - timedelta(minutes=10))
    ledger.engine.dispose()
    result = runner.invoke(app, ["reindex", "--all", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["images"], plan["dry_run"]) == (13, True)
    assert plan["measured_images_per_second"] == pytest.approx(BURST_RATE, abs=1e-3)
    assert plan["estimated_seconds"] == pytest.approx(11.0)


def test_a_real_run_of_an_empty_scope_reports_no_results(home: Path) -> None:
    """Not a dry run, a scope matching no image: `{"results": []}` with --json, a plain sentence
    without, exit 0 both ways; --dry-run of the same scope still prints its plan."""
    result = runner.invoke(app, ["reindex", "--sku", "NOPE", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"] == []
    assert "dry_run" not in json.loads(result.stdout)

    result = runner.invoke(app, ["reindex", "--sku", "NOPE"])
    assert result.exit_code == 0, result.output
    assert "nothing to re-index" in result.output and "--sku" in result.output

    result = runner.invoke(app, ["reindex", "--sku", "NOPE", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "scope": "--sku", "images": 0, "skus": 0, "dry_run": True,
        "estimated_seconds": None, "measured_images_per_second": None,
    }


def test_a_local_prefix_names_a_folder_also_once_it_is_gone(home: Path, tmp_path: Path) -> None:
    """`--prefix CATALOG/SKU-1` scopes SKU-1's folder whether it exists, is written with a trailing
    /, or was removed (it then widened to SKU-10 and SKU-11 beside it); a path that never was a
    folder stays the start of file names."""
    catalog = tmp_path / "catalog"
    ledger = empty_ledger(Settings(_env_file=None).effective_database_url)  # type: ignore[call-arg]
    events = [ImageEvent(uri=str(catalog / sku / f"{i}.jpg"), sku=sku, version=10) for sku in ("SKU-1", "SKU-10", "SKU-11") for i in range(2)]
    ledger.accept_many(events, "r")
    ledger.engine.dispose()

    def scope(prefix: str) -> tuple[int, int]:
        result = runner.invoke(app, ["reindex", "--prefix", prefix, "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        return plan["images"], plan["skus"]

    (catalog / "SKU-1").mkdir(parents=True)
    assert scope(str(catalog / "SKU-1")) == (2, 1)
    (catalog / "SKU-1").rmdir()
    assert scope(str(catalog / "SKU-1")) == (2, 1)
    assert scope(str(catalog / "SKU-1") + "/") == (2, 1)
    assert scope(str(catalog / "SKU-1") + "1") == (2, 1)  # no folder SKU-11 here, but the ledger's
    assert scope(str(catalog / "SKU")) == (6, 3)  # the start of names
