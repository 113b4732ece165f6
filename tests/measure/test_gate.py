"""The speed gate: limits from the original, a child process killed when a call overruns, the verdict."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from modelpress.core.report import Latency, ModelStats, speed_cell
from modelpress.measure import gate
from modelpress.measure.gate import call_limits, probe, verdict


def _stats(name: str, **p50: float) -> ModelStats:
    return ModelStats(name=name, latency_ms={bs.removeprefix("bs"): Latency(v, v, v, v, 5) for bs, v in p50.items()})


def _onnx(tmp_path):
    from modelpress.export.onnx import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    path = export_onnx(model, (torch.randn(2, 64),), tmp_path / "mlp.onnx")
    return path, {"1": (torch.randn(1, 64),), "32": (torch.randn(32, 64),)}


def test_limits_follow_the_original_with_a_floor():
    limits = call_limits(_stats("orig", bs1=2.0, bs32=900.0))
    assert limits["1"] == gate.MIN_CALL_LIMIT_S
    assert limits["32"] == pytest.approx(gate.SPEED_LIMIT_FACTOR * 0.9)


def test_a_healthy_artifact_is_timed_in_the_child(tmp_path):
    path, inputs = _onnx(tmp_path)
    result = probe("onnx", path, inputs, {"1": 30.0, "32": 30.0}, threads=1)
    assert result.stopped is None and result.error is None
    assert set(result.ms) == {"1", "32"} and all(v > 0 for v in result.ms.values())


def test_a_call_past_its_limit_is_stopped_and_the_child_killed(tmp_path, monkeypatch):
    path, inputs = _onnx(tmp_path)
    children = []
    popen = gate.subprocess.Popen

    def spy(*args, **kwargs):
        children.append(popen(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(gate.subprocess, "Popen", spy)
    start = time.perf_counter()
    # batch 1 passes; batch 32's limit is far below one call's time (a pathological artifact here)
    result = probe("onnx", path, inputs, {"1": 30.0, "32": 1e-6}, threads=1)
    assert result.stopped == "32" and result.limit_s == pytest.approx(2e-6)  # the warm-up call's limit
    assert "1" in result.ms and "32" not in result.ms
    assert time.perf_counter() - start < gate.LOAD_LIMIT_S
    (child,) = children
    assert child.returncode is not None  # killed and reaped, not left running
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)


def test_a_broken_artifact_is_an_error_not_a_stop(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = probe("onnx", bad, {"1": (torch.randn(1, 4),)}, {"1": 30.0})
    assert result.stopped is None and result.error and "not a valid ONNX model" in result.error


def test_verdict_flags_a_slower_artifact_with_the_figures():
    original = _stats("orig", bs1=10.0, bs32=100.0)
    fast = verdict(_stats("fast", bs1=5.0, bs32=40.0), original)
    assert fast["status"] == "ok" and fast["speedup"] == {"1": 2.0, "32": 2.5}
    slow = _stats("model.pt2", bs1=5.0, bs32=250.0)
    slow.speed_gate = verdict(slow, original)
    assert slow.speed_gate["status"] == "slower"
    assert slow.speed_gate["message"] == "model.pt2: slower than the original: 250.00 ms against 100.00 ms at batch 32"
    assert speed_cell(slow, ["1", "32"]) == "SLOWER 2x/0.4x"
