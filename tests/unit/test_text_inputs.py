"""Text a user or a store hands in: names that are not UTF-8 (a Linux file name may hold any bytes,
Python reads them as surrogates; SQLite text too; JSON may carry lone ``\\udcXX`` escapes) and empty
filters. A file keeps its bytes through its (percent-encoded) uri; a SKU or an S3/HTTP uri must be
text, and is refused with its bytes shown as ``\\xNN``; an empty ``--sku`` or version reference is a
usage error, not a filter of everything. Nothing prints a traceback or a document no JSON reader takes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from schemas.events import ImageEvent, escape_bytes, path_from_uri
from schemas.outputs import ErrorOutput
from tests.helpers import photo
from worker.cli.main import app
from worker.ledger import Ledger, make_engine

runner = CliRunner()


def save(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(64, 48, seed=0).save(path, format="JPEG")
    return path


def test_a_file_uri_keeps_the_bytes_of_its_name(tmp_path: Path) -> None:
    path = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    event = ImageEvent(uri=str(path), sku="SKU-1")
    assert event.uri.isascii() and event.uri.endswith("/caf%E9.jpg")
    assert path_from_uri(event.uri) == path and os.fsencode(path_from_uri(event.uri)).endswith(b"caf\xe9.jpg")


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        ({"uri": "s3://bucket/a\udcff.jpg", "sku": "S"}, "uri 's3://bucket/a\\xff.jpg' is not valid UTF-8"),
        ({"uri": "https://cdn.example.com/\udce9.jpg", "sku": "S"}, "is not valid UTF-8"),
        ({"uri": "/tmp/a.jpg", "sku": "SK\udce9"}, "sku 'SK\\xe9' is not valid UTF-8"),
    ],
)
def test_a_sku_or_key_that_is_not_utf8_is_refused_with_its_bytes(fields: dict, shown: str) -> None:
    with pytest.raises(ValidationError, match="not valid UTF-8") as info:
        ImageEvent(**fields)
    assert shown in str(info.value)


def test_escape_bytes_leaves_text_alone() -> None:
    assert escape_bytes("caf\u00e9 \\x41") == "caf\u00e9 \\x41"
    assert escape_bytes("caf\udce9") == "caf\\xe9"


def test_index_refuses_a_sku_folder_that_is_not_utf8_as_a_usage_error(home: Path, tmp_path: Path) -> None:
    """`index --json` of a catalog with a SKU folder named in Latin-1 exits 2 with the error as its one
    JSON document (it printed a pydantic traceback and exited 1), and queues nothing."""
    catalog = tmp_path / "catalog"
    save(catalog / "SKU-1" / "a.jpg")
    save(catalog / os.fsdecode(b"SK\xe9") / "b.jpg")
    result = runner.invoke(app, ["index", str(catalog), "--json"])
    assert result.exit_code == 2, result.output
    error = ErrorOutput.model_validate_json(result.stdout).error
    assert error.kind == "usage" and "sku 'SK\\xe9' is not valid UTF-8" in error.message and "--sku" in error.message
    assert "Traceback" not in result.output
    ledger = Ledger(make_engine(f"sqlite:///{home / 'state.db'}"))
    assert ledger.select() == []
    ledger.engine.dispose()


def test_index_queues_a_file_named_in_another_encoding(home: Path, tmp_path: Path) -> None:
    """A file whose name is not UTF-8 is queued under its percent-encoded uri (it was: a later fetch
    read a look-alike name with U+FFFD, not_found); a missing one is a usage error whose JSON parses."""
    image = save(tmp_path / "catalog" / "SKU-1" / os.fsdecode(b"caf\xe9.jpg"))
    queued = runner.invoke(app, ["index", str(image), "--json"])
    assert queued.exit_code == 0, queued.output
    ledger = Ledger(make_engine(f"sqlite:///{home / 'state.db'}"))
    (row,) = ledger.select()
    assert row.uri.endswith("/SKU-1/caf%E9.jpg") and path_from_uri(row.uri) == image
    ledger.engine.dispose()
    missing = runner.invoke(app, ["index", str(image.with_name(os.fsdecode(b"gone\xff.jpg"))), "--json"])
    assert missing.exit_code == 2
    assert "gone\\xff.jpg: no such file or folder" in ErrorOutput.model_validate_json(missing.stdout).error.message


@pytest.mark.parametrize(
    "args",
    [["index", "{image}", "--sku", ""], ["index", "{image}", "--sku", "   "], ["reindex", "--sku", "", "--dry-run"],
     ["failures", "list", "--sku", ""], ["failures", "replay", "--sku", " "], ["cutover", " "], ["verify", "--model", ""]],
)
def test_an_empty_sku_or_version_is_a_usage_error_not_a_filter_of_all(home: Path, tmp_path: Path, args: list[str]) -> None:
    """`--sku ""` was ignored (index took the folder's name, `failures replay` replayed every failure),
    and an empty version reference matched the only version (`cutover ''` switched to it)."""
    image = save(tmp_path / "SKU-1" / "a.jpg")
    result = runner.invoke(app, [a.format(image=image) for a in args] + ["--json"])
    assert result.exit_code == 2, result.output
    assert ErrorOutput.model_validate_json(result.stdout).error.kind == "usage"


def test_a_sku_filter_is_trimmed_as_skus_are_stored(home: Path, tmp_path: Path) -> None:
    """SKUs are stored trimmed: `reindex --sku " SKU-1"` found nothing."""
    image = save(tmp_path / "SKU-1" / "a.jpg")
    assert runner.invoke(app, ["index", str(image)]).exit_code == 0
    result = runner.invoke(app, ["reindex", "--sku", " SKU-1 ", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 1
