"""Which device a worker's models go on, by the queues it serves."""

from __future__ import annotations

import pytest
import torch

from worker.cli.main import role_settings
from worker.errors import ConfigError


def test_cpu_queues_build_models_on_the_cpu(make_settings) -> None:
    """Preprocess/SKU workers need only the models' preprocessing: never a CUDA context per child."""
    s = make_settings(device="cuda:0")
    q = s.queues
    assert role_settings(s, [q.preprocess, q.sku]).device == "cpu"
    assert role_settings(s, [q.preprocess]).encoder.device == "cpu"
    assert role_settings(s, [q.encode]).device == "cuda:0"  # the encode worker keeps the GPU


def test_mixed_worker_on_cpu_is_allowed(make_settings) -> None:
    s = make_settings(device="cpu")
    assert role_settings(s, s.queues.all()).device == "cpu"


def test_mixed_worker_on_a_gpu_is_refused(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encode + CPU queues in one prefork worker cannot share a CUDA context. No GPU here: the
    device resolution is replaced by one that answers CUDA (the only fake in this test)."""
    import worker.encoders.device as device

    monkeypatch.setattr(device, "resolve_device", lambda setting: torch.device("cuda:0"))
    s = make_settings(device="auto")
    with pytest.raises(ConfigError, match="worker of its own"):
        role_settings(s, s.queues.all())
    assert role_settings(s, [s.queues.encode]).device == "auto"


def test_device_jpeg_decode_on_a_cpu_encoder_is_allowed_with_a_warning(make_settings, caplog) -> None:
    """IMGSYNC_JPEG_DECODE=encoder with a CPU encode worker works (tests use it) but says it only
    pays off on CUDA; on a CPU-queue worker it says nothing (that worker only hands bytes over)."""
    import logging

    s = make_settings(device="cpu", jpeg_decode="encoder")
    with caplog.at_level(logging.WARNING, logger="imgsync"):
        role_settings(s, [s.queues.preprocess, s.queues.sku])
        assert not caplog.records
        assert role_settings(s, [s.queues.encode]).jpeg_decode == "encoder"
    assert "pays off on CUDA only" in caplog.text
