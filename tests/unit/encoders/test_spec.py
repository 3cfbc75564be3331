"""Model specs: one parser, one factory, errors that name the setting and the choices."""

from __future__ import annotations

import pytest

from worker.encoders import BACKENDS, create_encoder, parse_spec
from worker.encoders.base import ModelSpec
from worker.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tiny", ModelSpec("tiny", "imgsync-tiny", None)),
        ("open_clip:ViT-B-32", ModelSpec("open_clip", "ViT-B-32", None)),
        ("open_clip:ViT-B-32@openai", ModelSpec("open_clip", "ViT-B-32", "openai")),
        ("open_clip:ViT-B-32@/models/a@b.pt", ModelSpec("open_clip", "ViT-B-32@/models/a", "b.pt")),
        ("open_clip:hf-hub:org/repo", ModelSpec("open_clip", "hf-hub:org/repo", None)),
        ("timm:resnet50.a1_in1k", ModelSpec("timm", "resnet50", "a1_in1k")),  # timm's own naming of a tag
        ("timm:resnet50@a1_in1k", ModelSpec("timm", "resnet50", "a1_in1k")),
    ],
)
def test_parse(text: str, expected: ModelSpec) -> None:
    """Specs split into backend, name and weights (the last '@' separates weights)."""
    assert parse_spec(text) == expected


@pytest.mark.parametrize("text", ["", "ViT-B-32", "open_clip:", "open_clip:ViT-B-32@", "nope:x"])
def test_bad_specs_name_setting_and_backends(text: str) -> None:
    """A malformed spec or unknown backend is a ConfigError naming IMGSYNC_MODEL."""
    with pytest.raises(ConfigError, match="IMGSYNC_MODEL") as err:
        create_encoder(text)
    if text.startswith("nope"):
        assert all(b in str(err.value) for b in BACKENDS)


def test_unknown_open_clip_architecture_fails_at_load() -> None:
    """open_clip:NoSuchNet fails with one line naming the setting."""
    with pytest.raises(ConfigError, match="NoSuchNet"):
        create_encoder("open_clip:NoSuchNet").load()


def test_missing_weights_file_fails_at_load(tmp_path) -> None:
    """A weights path that does not exist is a ConfigError, not a download attempt."""
    with pytest.raises(ConfigError, match="does not exist"):
        create_encoder(f"open_clip:ViT-B-32@{tmp_path}/missing.pt").load()


def test_unknown_pretrained_tag_lists_valid_tags() -> None:
    """An unknown pretrained tag is refused with the valid tags, before any download."""
    with pytest.raises(ConfigError, match="laion2b"):
        create_encoder("open_clip:ViT-B-32@nosuchtag").load()
