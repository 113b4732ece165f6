from __future__ import annotations

import json

import pytest
import torch

from modelpress.core import BadInputError, Context, Latency, ModelStats, Quality, Report, RunOptions
from modelpress.core.atomic import atomic_dir, atomic_path


def _stats(name: str, size: int) -> ModelStats:
    return ModelStats(
        name=name,
        size_bytes=size,
        params=10,
        nonzero_params=8,
        latency_ms={"1": Latency(1.0, 1.5, 1.1, 0.9, 30), "32": Latency(10.0, 12.0, 10.5, 9.0, 30)},
        quality=Quality("accuracy", 0.97),
    )


def test_report_json_has_the_contract_keys_and_round_trips(tmp_path):
    report = Report(
        model="digits-cnn",
        recipe={"passes": []},
        baseline=_stats("fp32", 400),
        compressed=_stats("int8", 100),
        parity={"max_abs": 1e-5},
    )
    report.add_pass("quantize", 1.25, layers=3)
    report.data["calibration"] = {"source": "digits", "split": "train", "count": 64}
    report.warn("skipped conv3")
    report.warn("skipped conv3")  # listed once
    paths = report.write(tmp_path)
    data = json.loads(paths[0].read_text())
    for key in ("model", "recipe", "baseline", "compressed", "passes", "parity", "environment"):
        assert key in data
    for key in ("size_bytes", "params", "nonzero_params", "latency_ms", "quality"):
        assert key in data["baseline"]
    assert data["baseline"]["latency_ms"]["32"]["p90"] == 12.0
    assert data["compressed"]["quality"] == {
        "name": "accuracy",
        "value": 0.97,
        "higher_is_better": True,
        "details": {},
    }
    assert data["passes"] == [{"name": "quantize", "seconds": 1.25, "stats": {"layers": 3}}]
    assert data["warnings"] == ["skipped conv3"]
    assert set(data["environment"]) >= {"versions", "cpu", "threads"}
    assert Report.from_dict(data).to_dict() == report.to_dict()
    md = paths[1].read_text()
    assert "| fp32 | 0.00 | 10 | 8 | 1.00 | 10.00 | accuracy 0.9700 |" in md
    assert data["data"] == {"calibration": {"source": "digits", "split": "train", "count": 64}}
    assert "| calibration | digits | train | 64 |" in md


def test_context_threads_scope_restores_and_validates():
    before = torch.get_num_threads()
    with Context(options=RunOptions(threads=1)).threads_scope():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(BadInputError, match="threads must be a positive integer, got 0"):
        Context(options=RunOptions(threads=0))


def test_context_warn_lands_in_report():
    ctx = Context(report=Report(model="m"))
    with pytest.warns(UserWarning, match="skipped"):
        ctx.warn("skipped lstm: unsupported")
    assert ctx.report.warnings == ["skipped lstm: unsupported"]
    assert list(Context(options=RunOptions(progress=False)).progress(range(3), "x")) == [0, 1, 2]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [".modelpress", "a.txt"]  # the marker: modelpress wrote it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out) as tmp:  # success: the new content takes the old one's place in one step
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [".modelpress", "c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
