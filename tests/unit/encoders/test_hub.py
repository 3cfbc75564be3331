"""Are a model's weights here? (worker.encoders.hub) — checked before a worker starts, for every
backend that downloads weights, against a real hub cache layout on disk (the hub itself cannot be
reached from here)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from worker.encoders import hub
from worker.errors import ConfigError


def cache_file(cache: Path, repo: str, filename: str) -> None:
    """What huggingface_hub leaves after downloading ``filename`` of ``repo``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0123abcd")
    snap = root / "snapshots" / "0123abcd"
    snap.mkdir(parents=True, exist_ok=True)
    (snap / filename).write_text("{}")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


@pytest.mark.parametrize(
    ("spec", "repo", "filename"),
    [
        ("hf:openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32", "config.json"),
        ("hf:clip@openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32", "config.json"),
        ("timm:resnet50@a1_in1k", "timm/resnet50.a1_in1k", "model.safetensors"),
        ("timm:resnet50.a1_in1k", "timm/resnet50.a1_in1k", "model.safetensors"),
        ("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
         "open_clip_config.json"),
        ("open_clip:ViT-B-32@laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors"),
    ],
)
def test_downloaded_weights_are_found_in_the_hub_cache(cache: Path, spec: str, repo: str, filename: str) -> None:
    assert not hub.weights_cached(spec)
    with pytest.raises(ConfigError, match="IMGSYNC_MODEL"):
        hub.check_weights_available(spec)
    cache_file(cache, repo, filename)
    assert hub.weights_cached(spec)
    hub.check_weights_available(spec)  # no error: a worker starts offline on cached weights


def test_an_hf_model_missing_offline_fails_at_once(cache: Path) -> None:
    """Was: accepted, then 30 s of hub retries inside the worker before its error."""
    started = time.monotonic()
    with pytest.raises(ConfigError, match="not cached here and the model hub is unreachable"):
        hub.check_weights_available("hf:openai/clip-vit-base-patch32")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("spec", ["tiny", "timm:resnet18", "open_clip:ViT-B-32", "random:64"])
def test_specs_without_downloads_need_nothing(cache: Path, spec: str) -> None:
    assert hub.weights_cached(spec)


def test_the_hub_checked_is_hf_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror in HF_ENDPOINT is the hub asked (its host and port), not huggingface.co:443."""
    import socket

    from huggingface_hub import constants

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        assert hub.hub_reachable()
    finally:
        listener.close()
    assert not hub.hub_reachable()  # nobody listens there any more


def test_local_weights_are_available(cache: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    assert hub.weights_cached(f"open_clip:ViT-B-32@{ckpt}")
    assert hub.weights_cached(f"timm:resnet50@{ckpt}")
    folder = tmp_path / "clip"
    folder.mkdir()
    assert hub.weights_cached(f"hf:{folder}")
