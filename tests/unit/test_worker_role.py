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
