"""Auto mode: every candidate measured here, the best artifact within the quality budget kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelpress.auto import AutoSearch, auto_compress
from modelpress.cli import main
from modelpress.core import ConfigError
from modelpress.core.errors import BadInputError
from modelpress.core.options import RunOptions


def test_picks_the_fastest_artifact_within_the_budget(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelpress.measure

    measured: list[str] = []
    real_bench = modelpress.measure.bench

    def bench(specs, **kw):  # noqa: ANN001, ANN003, ANN202 - records which models were measured
        measured.extend(s[0] for s in specs)
        return real_bench(specs, **kw)

    monkeypatch.setattr(modelpress.measure, "bench", bench)
    out = tmp_path / "auto"
    search = AutoSearch(max_drop=0.003, candidates=("float", "int8-static"))
    options = RunOptions(threads=2, batch_sizes=(1, 8), repeats=3, progress=False)
    chosen, report = auto_compress("digits-cnn", search, out_dir=out, options=options)
    rows = report.auto["candidates"]
    assert [(r["recipe"], r["artifact"].split()[0]) for r in rows] == [
        ("float", "model.onnx"), ("float", "model.pt2"), ("int8-static", "model.onnx"), ("int8-static", "model.pt2"),
    ]  # fmt: skip
    eligible = [r for r in rows if r["within_budget"] and not r["slower_than_original"]]
    fastest = min(eligible, key=lambda r: r["p50_ms"])
    assert report.auto["chosen"] == f"{fastest['recipe']}: {fastest['artifact']}"
    assert chosen.name == fastest["artifact"] and fastest["drop"] <= 0.003
    # the budget is checked on the held-out validation split; the test split is what is reported
    base_val = report.baseline.validation_quality
    assert base_val is not None and base_val.details["split"] == "val"
    for r in rows:
        assert r["drop_split"] == "validation"
        assert r["drop"] == pytest.approx(base_val.value - r["validation_quality"])
        assert r["test_drop"] == pytest.approx(report.baseline.quality.value - r["quality"])
    assert measured.count("digits-cnn (original)") == 1  # the original is measured once per run
    saved = json.loads((out / "report.json").read_text())
    assert saved["auto"]["chosen"] == report.auto["chosen"] and (out / "model.onnx").exists()
    assert "Auto mode" in (out / "report.md").read_text()


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="max_drop must be >= 0, got -1"):
        auto_compress("digits-cnn", -1, out_dir=tmp_path / "a")
    with pytest.raises(BadInputError, match="auto mode needs a task metric"):
        auto_compress("loading_factories:tiny_mlp", 0.1, out_dir=tmp_path / "a")
    assert main(["compress", "digits-cnn", "--out", str(tmp_path / "b")]) == 2
    assert "either --recipe RECIPE or --auto" in capsys.readouterr().err
    assert main(["compress", "digits-cnn", "--auto", "--out", str(tmp_path / "b")]) == 2
    assert "--auto needs --max-drop" in capsys.readouterr().err
    args = ["compress", "digits-cnn", "--auto", "--max-drop", "0.01", "--out", str(tmp_path / "b")]
    assert main([*args, "--candidates", "int8-static,nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main([*args, "--candidates", " , "]) == 2
    assert "names no recipe" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_relative_budget_compares_the_change_with_the_original():
    """`--max-drop 5%`: a perplexity may rise by 5% of the original's (lower is better)."""
    from modelpress.auto import _row, parse_max_drop
    from modelpress.core.report import Latency, ModelStats, Quality

    assert parse_max_drop("5%") == (0.05, True) and parse_max_drop(0.5) == (0.5, False)
    assert parse_max_drop("0.5") == (0.5, False)

    def stats(ppl: float) -> ModelStats:
        q = Quality("perplexity", ppl, higher_is_better=False)
        return ModelStats(name="m", quality=q, latency_ms={"1": Latency(1.0, 1.0, 1.0, 1.0, 5)})

    base = stats(20.0)
    assert _row("r", stats(20.9), base, parse_max_drop("5%"), (1,))["within_budget"]  # +4.5%
    assert not _row("r", stats(21.1), base, parse_max_drop("5%"), (1,))["within_budget"]  # +5.5%
    assert not _row("r", stats(20.9), base, parse_max_drop(0.5), (1,))["within_budget"]  # +0.9 > 0.5 units
    assert _row("r", stats(19.0), base, parse_max_drop("5%"), (1,))["relative_drop"] == pytest.approx(-0.05)
