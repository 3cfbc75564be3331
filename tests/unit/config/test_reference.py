"""README's settings reference is generated from the settings class."""

from __future__ import annotations

from pathlib import Path

from config.reference import BEGIN, END, settings_table
from config.settings import Settings

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_settings_reference_matches_settings_class() -> None:
    """The table in README.md is exactly what `python -m config.reference` prints."""
    text = README.read_text()
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert block == settings_table(), "README settings table is stale: run `python -m config.reference`"
    for name in Settings.model_fields:
        assert f"`IMGSYNC_{name.upper()}`" in block
