"""The encode worker's back-pressure gate: trips on infrastructure failures, reopens only when the
health probe passes."""

from __future__ import annotations

from worker.health import Gate, probe_device


def test_gate_stays_closed_until_the_probe_passes() -> None:
    g = Gate()
    assert g.is_open() and g.try_reopen(lambda: "never called") and g.closed_for() == 0.0
    g.trip("index_unavailable: Milvus down")
    g.trip("device_error: later cause")  # the first cause is kept while closed
    assert not g.is_open() and g.reason.startswith("index_unavailable")
    assert g.try_reopen(lambda: "Milvus at http://x does not answer") is False
    assert not g.is_open() and g.reason == "Milvus at http://x does not answer"
    assert g.closed_for() > 0
    assert g.try_reopen(lambda: None) is True
    assert g.is_open() and g.closed_for() == 0.0


def test_device_probe() -> None:
    assert probe_device("cpu") is None
    problem = probe_device("no-such-device")
    assert problem is not None and problem.startswith("device no-such-device")
