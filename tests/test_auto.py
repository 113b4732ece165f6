"""Auto mode: a search within a quality and a time budget; the candidate table, the recipe, the cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from modelpress.auto import AutoSearch, auto_compress, parse_duration, parse_max_drop
from modelpress.auto.space import Candidate, candidates, family, named, pt2_worth_timing, spread_layers
from modelpress.auto.trial import drop_of
from modelpress.cli import main
from modelpress.core import ConfigError
from modelpress.core.errors import BadInputError
from modelpress.core.options import RunOptions
from modelpress.recipes.recipe import load_recipe

QUIET = {"threads": 1, "batch_sizes": (1, 8), "repeats": 3, "progress": False}


def test_chooses_the_fastest_measured_artifact_and_writes_its_recipe(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "auto"
    search = AutoSearch(max_drop=0.003, candidates=("float", "int8-static"), cache=False)
    options = RunOptions(**QUIET)
    chosen, report = auto_compress("digits-cnn", search, out_dir=out, options=options)
    rows = report.auto["candidates"]
    measured = [r for r in rows if r["stage"] == "measured"]
    assert measured and {r["recipe"] for r in rows} == {"float", "int8-static"}
    eligible = [r for r in measured if r["within_budget"] and not r["slower_than_original"]]
    fastest = min(eligible, key=lambda r: r["p50_ms"])
    (chosen_row,) = [r for r in rows if r["status"] == "chosen"]
    runoff = report.auto["runoff"] or {}
    if runoff.get("chosen"):  # forms within 15% timed again together: the lowest median wins
        assert f"{fastest['recipe']} {fastest['artifact'].split()[0]}" in runoff["median_ms"]
        assert runoff["chosen"] == f"{chosen_row['recipe']} {chosen_row['artifact'].split()[0]}"
        assert runoff["median_ms"][runoff["chosen"]] == min(runoff["median_ms"].values())
    else:
        assert fastest["status"] == "chosen"
        assert report.auto["chosen"] == f"{fastest['recipe']}: {fastest['artifact']}"
    assert chosen.name == chosen_row["artifact"] and chosen_row["drop"] <= 0.003
    # the budget is checked on the held-out validation split; the test split is what is reported
    base_val = report.baseline.validation_quality
    assert base_val is not None and base_val.details["split"] == "val"
    for r in measured:
        assert r["drop_split"] == "validation"
        assert r["drop"] == pytest.approx(base_val.value - r["validation_quality"])
        assert r["test_drop"] == pytest.approx(report.baseline.quality.value - r["quality"])
    for r in rows:  # every row says what happened to it; a dropped one says why
        assert r["status"] in ("chosen", "measured", "dropped", "stopped", "refused", "skipped", "not timed", "slower")
        assert r["status"] not in ("dropped", "stopped", "refused", "skipped") or r["why"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["auto"]["chosen"] == report.auto["chosen"] and (out / "model.onnx").exists()
    assert saved["auto"]["pareto"]["latency"] and "Auto mode" in (out / "report.md").read_text()
    assert "validation quality against latency" in (out / "report.html").read_text()
    # the choice as a recipe: loadable by `compress --recipe`, and it rebuilds the same model
    recipe = load_recipe(out / "recipe.yaml")
    assert [p.to_dict() for p in recipe.passes] == saved["recipe"]["passes"]
    again = tmp_path / "again"
    capsys.readouterr()
    args = ["compress", "digits-cnn", "--recipe", str(out / "recipe.yaml"), "--out", str(again), "--threads", "1"]
    assert main([*args, "--batch-sizes", "1,8", "--json"]) == 0
    rebuilt = json.loads((again / "report.json").read_text())
    name = fastest["artifact"]
    rebuilt_q = next(a["quality"]["value"] for a in rebuilt["artifacts"] if a["name"] == name)
    assert rebuilt_q == pytest.approx(fastest["quality"], abs=1e-9)


def test_a_second_run_reuses_what_the_first_measured(tmp_path: Path, cache_dir: Path) -> None:
    search = AutoSearch(max_drop=0.01, candidates=("float", "w8"))
    options = RunOptions(**QUIET, cache_dir=tmp_path / "cache")
    start = time.perf_counter()
    _, first = auto_compress("digits-cnn", search, out_dir=tmp_path / "a", options=options)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    _, second = auto_compress("digits-cnn", search, out_dir=tmp_path / "b", options=options)
    second_s = time.perf_counter() - start
    assert first.auto["cache"]["hits"] == 0
    assert second.auto["cache"]["hits"] > 0 and second.auto["chosen"] == first.auto["chosen"]
    assert all(r["cached"] for r in second.auto["candidates"] if r["stage"] == "measured")
    assert second_s < first_s
    assert (tmp_path / "b" / "recipe.yaml").read_text() == (tmp_path / "a" / "recipe.yaml").read_text()


def test_a_pathologically_slow_candidate_cannot_blow_the_budget(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every call of int8-static's artifacts runs until the speed gate stops it (as an AOTInductor package 140x
    slower than fp32 did on a CPU without AMX): the search drops it and ends within its budget."""
    import modelpress.measure.gate as gate

    real_probe = gate.probe
    slow: list[str] = []

    def probe(kind, path, inputs, limits, threads=None, calls=gate.PROBE_CALLS):  # noqa: ANN001, ANN202
        if "int8-static" in str(path):
            bs = min(limits, key=int)
            time.sleep(limits[bs])  # the child ran until it was killed at its limit
            slow.append(kind)
            return gate.ProbeResult(stopped=bs, limit_s=limits[bs])
        return real_probe(kind, path, inputs, limits, threads, calls)

    monkeypatch.setattr(gate, "probe", probe)
    budget = 120.0
    search = AutoSearch(max_drop=0.01, candidates=("int8-static", "float"), time_budget=budget, cache=False)
    start = time.perf_counter()
    _, report = auto_compress("digits-cnn", search, out_dir=tmp_path / "a", options=RunOptions(**QUIET))
    assert time.perf_counter() - start < budget
    assert slow, "the slow candidate was timed"
    stopped = [r for r in report.auto["candidates"] if r["recipe"] == "int8-static"]
    assert stopped and all(r["status"] == "stopped" and "speed gate" in r["why"] for r in stopped)
    assert report.auto["chosen"].startswith("float")


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="max_drop must be >= 0, got -1"):
        auto_compress("digits-cnn", -1, out_dir=tmp_path / "a")
    with pytest.raises(BadInputError, match="auto mode needs a task metric"):
        auto_compress("loading_factories:tiny_mlp", 0.1, out_dir=tmp_path / "a")
    with pytest.raises(BadInputError, match=r"time budget 0\.0 s is too small: measuring the original alone takes"):
        auto_compress("digits-cnn", AutoSearch(max_drop=0.01, time_budget="0.01s"), out_dir=tmp_path / "a",
                      options=RunOptions(**QUIET))  # fmt: skip
    assert main(["compress", "digits-cnn", "--out", str(tmp_path / "b")]) == 2
    assert "either --recipe RECIPE or --auto" in capsys.readouterr().err
    assert main(["compress", "digits-cnn", "--auto", "--out", str(tmp_path / "b")]) == 2
    assert "--auto needs --max-drop" in capsys.readouterr().err
    args = ["compress", "digits-cnn", "--auto", "--max-drop", "0.01", "--out", str(tmp_path / "b")]
    assert main([*args, "--time-budget", "5x"]) == 2
    err = capsys.readouterr().err
    assert "--time-budget" in err and "'5x'" in err and "90s, 5m, 1.5h" in err
    assert main([*args, "--candidates", "int8-static,nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main([*args, "--candidates", " , "]) == 2
    assert "names no recipe" in capsys.readouterr().err
    assert main(["compress", "digits-cnn", "--recipe", "w8", "--time-budget", "5m", "--out", str(tmp_path / "b")]) == 2
    assert "--time-budget goes with --auto" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_durations_and_budgets() -> None:
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("1h") == 3600
    assert parse_duration("1.5m") == 90 and parse_duration(42) == 42 and parse_duration(None) is None
    for bad in ("5x", "", "-5m", "0s", "m", "1e9h!", True):
        with pytest.raises(ConfigError, match="time_budget"):
            parse_duration(bad)  # type: ignore[arg-type]
    assert parse_max_drop("5%") == (0.05, True) and parse_max_drop(0.5) == (0.5, False)
    # a relative budget compares the change with the original's value: perplexity (lower is better) +5%
    assert drop_of(20.0, 20.9, False, parse_max_drop("5%")) == (pytest.approx(0.9), True)  # +4.5%
    assert not drop_of(20.0, 21.1, False, parse_max_drop("5%"))[1]  # +5.5%
    assert not drop_of(20.0, 20.9, False, parse_max_drop(0.5))[1]  # +0.9 > 0.5 units
    assert drop_of(0.99, 0.985, True, (0.005, False))[1] and not drop_of(0.99, 0.98, True, (0.005, False))[1]


def test_the_space_follows_the_model_family_and_the_cpu(cache_dir: Path) -> None:
    from modelpress.loading import resolve

    assert (
        spread_layers(6, 4) == [0, 2, 3, 5]
        and spread_layers(6, 3) == [0, 3, 5]
        and spread_layers(12, 4) == [0, 4, 7, 11]
    )
    cnn = resolve("digits-cnn")
    assert family(cnn) == "cnn"
    names = [c.name for c in candidates(cnn)]
    assert names[0] == "float" and {"int8-static", "int8-mixed", "w8", "student-w48"} <= set(names)
    costs = [c.cost for c in candidates(cnn)]
    assert costs == sorted(costs)  # cheap candidates first
    mixed = next(c for c in candidates(cnn) if c.name == "int8-mixed")
    assert type(mixed.recipe.passes[0]).__name__ == "MixedPrecisionConfig"  # the sensitivity analysis chooses
    # the .pt2 form is timed only where this CPU can run it fast, and where the model is slow enough to gain
    int8 = named("int8-static")
    assert isinstance(int8, Candidate) and int8.int8_activations
    assert not pt2_worth_timing(int8, {"int8": "avx2", "bf16": "none"}, 100.0)[0]
    assert pt2_worth_timing(int8, {"int8": "amx", "bf16": "amx"}, 100.0)[0]
    assert not pt2_worth_timing(int8, {"int8": "amx", "bf16": "amx"}, 0.5)[0]
    assert not pt2_worth_timing(named("float"), {"int8": "avx2", "bf16": "none"}, 100.0)[0]


def test_a_kept_student_is_screened_with_the_calibrated_candidates(tmp_path: Path, cache_dir: Path) -> None:
    """A trained candidate whose student an earlier run kept costs a calibration: it is screened ahead of the
    candidates that calibrate the whole model, not after them (on a CPU where the cheap candidates' forms are
    slow to build, the time budget would otherwise run out before it)."""
    from modelpress.auto.budget import Clock
    from modelpress.auto.search import reuse_students, screening_order
    from modelpress.auto.space import CALIBRATED, TRAINED
    from modelpress.auto.trial import Setting, Trial
    from modelpress.core.context import Context
    from modelpress.distill.api import student_file
    from modelpress.loading import resolve
    from modelpress.pipeline import calibration_for

    loaded = resolve("digits-cnn")
    space = candidates(loaded)
    options = RunOptions(**QUIET, cache_dir=tmp_path / "cache")  # its own: the placeholder below stays here
    setting = Setting(loaded=loaded, data=calibration_for(loaded, None, [c.recipe for c in space if c.recipe.passes]),
                      options=options, clock=Clock(None), cache=None, budget=(0.005, False))  # type: ignore[arg-type]  # fmt: skip
    trials = [Trial(cand=c, folder=tmp_path / c.name) for c in space]
    reuse_students(setting, trials)
    assert all(t.student is None for t in trials)
    order = [t.cand.name for t in screening_order(trials)]
    assert order[-2:] == ["student-w48", "student-w48-int8-static"]

    cfg = next(c for c in space if c.name == "student-w48").recipe.passes[0]
    assert loaded.entry is not None
    path = student_file(loaded.model, cfg, Context(data=setting.data, options=options,
                                                   training_data=loaded.entry.training_set))  # fmt: skip
    assert path is not None and path.is_relative_to(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"kept")
    trials = [Trial(cand=c, folder=tmp_path / c.name) for c in space]
    reuse_students(setting, trials)
    kept = {t.cand.name: t for t in trials if t.student is not None}
    assert set(kept) == {"student-w48", "student-w48-int8-static"}
    assert all(t.cand.cost == CALIBRATED and t.student == str(path) for t in kept.values())
    order = [t.cand.name for t in screening_order(trials)]
    first_calibrated = min(i for i, t in enumerate(screening_order(trials)) if t.cand.cost == CALIBRATED)
    assert order[first_calibrated : first_calibrated + 2] == ["student-w48", "student-w48-int8-static"]
    assert next(t for t in trials if t.cand.name == "channels-50").cand.cost == TRAINED  # pruning still trains


@pytest.mark.slow
def test_minilm_space_has_students_relative_to_the_teacher(cache_dir: Path) -> None:
    from modelpress.loading import resolve

    space = {c.name: c for c in candidates(resolve("minilm"))}
    assert {"student-l4of6-int8-smooth", "student-l3of6-int8-smooth"} <= set(space)
    student = space["student-l4of6-int8-smooth"].recipe.passes[0]
    assert list(student.student.layers) == [0, 2, 3, 5]


@pytest.mark.slow
def test_the_causal_lm_space(cache_dir: Path) -> None:
    from modelpress.loading import resolve

    lm = resolve("tiny-lm")
    assert family(lm) == "causal-lm"
    space = {c.name: c for c in candidates(lm)}
    assert {"rtn-w4-g32", "rtn-w8-channel", "gptq-w4-g128", "gptq-w4-g128-head4", "awq-w4-g128", "mixed-w4-g32",
            "sparsegpt-50", "wanda-2of4"} <= set(space)  # fmt: skip
    assert space["rtn-w8-g128"].recipe.passes[0].symmetric  # llama.cpp's Q8_0 holds symmetric 8-bit codes
    assert space["gptq-w4-g128"].targets == ("gguf", "genai") and space["gptq-w4-g128-head4"].params["head_bits"] == 4


@pytest.mark.slow
def test_a_causal_lm_within_a_relative_budget(tmp_path: Path, cache_dir: Path) -> None:
    search = AutoSearch(max_drop="5%", candidates=("rtn-w8-g128", "rtn-w4-g32"), time_budget="10m", cache=False)
    _, report = auto_compress("tiny-lm", search, out_dir=tmp_path / "lm", options=RunOptions(**QUIET))
    chosen = next(r for r in report.auto["candidates"] if r["status"] == "chosen")
    assert chosen["relative_drop"] <= 0.05
    # tiny-lm is byte-level, with no tokenizer a GenAI folder could carry: ranked by latency, and the report says so
    assert report.auto["objective"] == "latency"
    assert any("ranked by latency, not decode tokens/s" in w and "tokenizer" in w for w in report.warnings)
    assert (tmp_path / "lm" / "model.onnx").exists() or (tmp_path / "lm" / "model.pt2").exists()


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """digits-cnn exported to ONNX: a graph from outside, with no metric of its own."""
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    assert main(["export", "digits-cnn", "--out", str(path), "--json"]) == 0
    return path


def test_an_onnx_model_is_searched_over_onnx_runtime_quantizations(
    tmp_path: Path, digits_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ONNX model borrowing digits-cnn's metric: ONNX Runtime's quantizations of its graph, .onnx only. The
    original is timed 2 ms slower per call than its graph runs (a deployment slower than the candidates' own
    sessions), so the race between graphs of a model this small (0.1 ms) is not left to the machine's noise."""
    import dataclasses

    from modelpress.core.runtime import OnnxModel
    from modelpress.loading import resolve, with_entry_like

    class SlowOriginal(OnnxModel):
        def __call__(self, *inputs):  # noqa: ANN002, ANN204
            time.sleep(0.002)
            return super().__call__(*inputs)

    loaded = with_entry_like(resolve(digits_onnx), "digits-cnn")
    space = candidates(loaded)
    names = [c.name for c in space]  # Conv and Gemm nodes: no MatMul for 4-bit weight groups
    assert names == ["int8-dynamic", "int8-static", "int8-static-entropy", "int8-mixed"]  # no float: the original
    assert all(c.forms == ("onnx",) and c.recipe.export == ("onnx",) for c in space)
    assert pt2_worth_timing(space[1], {"int8": "amx", "bf16": "amx"}, 100.0) == (
        False, "an ONNX model has only its .onnx form: there is no .pt2 to compile")  # fmt: skip
    assert [c.recipe.export for c in candidates(loaded, ("w8",))] == [("onnx",)]  # a named recipe: its .onnx only
    slow = dataclasses.replace(loaded, model=SlowOriginal(digits_onnx, threads=1))
    out = tmp_path / "auto"
    search = AutoSearch(max_drop=0.005, cache=False)
    chosen, report = auto_compress(slow, search, out_dir=out, options=RunOptions(**QUIET))
    rows = report.auto["candidates"]
    assert {r["recipe"] for r in rows} == set(names)
    for r in rows:
        assert r["status"] in ("chosen", "measured", "dropped", "stopped", "skipped", "not timed", "slower"), r
        assert r["status"] not in ("dropped", "stopped", "skipped") or r["why"]
    assert all(r["why"].startswith("an ONNX model has only its .onnx form") for r in rows if "pt2" in r["artifact"])
    (winner,) = [r for r in rows if r["status"] == "chosen"]
    assert winner["artifact"].startswith("model.onnx") and winner["drop"] <= 0.005
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model.")) == ["model.onnx"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["recipe"]["export"] == ["onnx"] and saved["parity"]["onnx"]["mean_cosine_to_original"] > 0.99
    # the choice as a recipe: `compress --recipe` takes it on the same ONNX model, scored like digits-cnn
    recipe = load_recipe(out / "recipe.yaml")
    assert [p.to_dict() for p in recipe.passes] == saved["recipe"]["passes"] and recipe.export == ("onnx",)
    again = tmp_path / "again"
    capsys.readouterr()
    args = ["compress", str(digits_onnx), "--recipe", str(out / "recipe.yaml"), "--like", "digits-cnn"]
    assert main([*args, "--out", str(again), "--threads", "1", "--batch-sizes", "1,8", "--json"]) == 0
    rebuilt = json.loads((again / "report.json").read_text())
    assert rebuilt["compressed"]["quality"]["value"] == pytest.approx(winner["quality"], abs=1e-9)


def test_auto_mode_on_an_onnx_model_needs_a_metric(
    tmp_path: Path, digits_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["compress", str(digits_onnx), "--auto", "--max-drop", "0.01", "--out", str(tmp_path / "a")]
    assert main([*args, "--threads", "1", "--batch-sizes", "1"]) == 2
    err = capsys.readouterr().err
    assert "auto mode needs a task metric" in err and "--like" in err and "--eval-data" in err
    assert not (tmp_path / "a").exists()
