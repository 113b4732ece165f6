"""Medical diagnosis scenario: `medical-mixed` on the breast-cancer classifier loses no test accuracy.

Runs `examples/medical-diagnosis/run.py` end to end (train, select on validation, export, ONNX Runtime)
and asserts the quality tolerance on the test split, for the eager model and its ONNX artifact:
accuracy and sensitivity not lower than the float model's, AUC within `AUC_TOL`; and that every
layer really holds integer codes of the bit width the results report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from modelpress.core.report import Quality
from modelpress.quant import QLinear
from modelpress.zoo.base import get_entry
from modelpress.zoo.breast_cancer import evaluate_split, load_breast_cancer_split

EXAMPLE = "medical-diagnosis"  # examples/medical-diagnosis/run.py, loaded by the `example` fixture (conftest.py)
AUC_TOL = 0.005  # ROC AUC may move by at most this much; accuracy and sensitivity may not drop at all


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("breast-cancer-cache")


@pytest.fixture(scope="module")
def outcome(example: Any, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, torch.nn.Module, Path]:
    out = tmp_path_factory.mktemp("medical") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELPRESS_CACHE", str(cache))
        results, compressed = example.run(out, threads=1)
    return results, compressed, out


def _rows(results: dict) -> dict[str, dict]:
    return {r["model"]: r for r in results["rows"]}


def test_positive_class_is_malignant_and_splits_are_stratified() -> None:
    sizes = {s: len(load_breast_cancer_split(s)[1]) for s in ("train", "val", "test")}
    assert sizes == {"train": 341, "val": 114, "test": 114}
    _, y = load_breast_cancer_split("test")
    assert int((y == 0).sum()) == 43  # malignant in proportion (212 of 569)
    always_malignant = lambda x: torch.tensor([[1.0, 0.0]]).repeat(len(x), 1)  # noqa: E731
    q = evaluate_split(always_malignant, "test")
    assert isinstance(q, Quality) and q.details["positive"] == "malignant"
    assert q.details["sensitivity"] == 1.0 and q.details["specificity"] == 0.0
    assert q.value == pytest.approx(43 / 114)


def test_no_quality_drop_on_the_test_split(outcome: tuple) -> None:
    results, _, _ = outcome
    rows = _rows(results)
    fp32 = rows["fp32 (eager)"]["test"]
    assert fp32["accuracy"] >= 0.95 and fp32["auc"] >= 0.98  # a classifier worth protecting
    assert rows["fp32 (ONNX Runtime)"]["test"]["confusion"] == fp32["confusion"]
    for label in ("medical-mixed (eager)", "medical-mixed (ONNX Runtime)"):
        got = rows[label]["test"]
        assert got["accuracy"] >= fp32["accuracy"], label
        assert got["sensitivity"] >= fp32["sensitivity"], label
        assert abs(got["auc"] - fp32["auc"]) <= AUC_TOL, label
    # The compressed artifact is smaller than the float one.
    assert rows["medical-mixed (ONNX Runtime)"]["size_bytes"] < rows["fp32 (ONNX Runtime)"]["size_bytes"]
    assert rows["medical-mixed (eager)"]["size_bytes"] < rows["fp32 (eager)"]["size_bytes"]


def test_selection_uses_the_validation_split(outcome: tuple, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, _, _ = outcome
    monkeypatch.setenv("MODELPRESS_CACHE", str(cache))
    model = get_entry("breast-cancer").load()
    sel = results["selection"]
    val, test = evaluate_split(model, "val").value, evaluate_split(model, "test").value
    assert val != test  # otherwise the check below could not tell the splits apart
    assert sel["baseline"] == pytest.approx(val)
    assert sel["baseline"] - sel["quality"] <= 0.0  # max_drop 0: the selected model loses nothing on val
    assert sel["promoted"], "2-bit weights everywhere cost validation accuracy; some layer must be promoted"


def test_layers_are_quantized_at_the_reported_bits(outcome: tuple) -> None:
    results, compressed, out = outcome
    bits = _rows(results)["medical-mixed (eager)"]["bits"]
    assert set(bits) == {"fc1", "fc2", "classifier"}
    assert set(bits.values()) == {2, 8}  # mixed: some layers stay at the 2-bit base, the promoted ones at 8
    assert sorted(n for n, b in bits.items() if b == 8) == sorted(results["selection"]["promoted"])
    shapes = {}
    for name, b in bits.items():
        layer = compressed.get_submodule(name)
        assert isinstance(layer, QLinear) and layer.weight_scheme.bits == b
        codes = layer.weight_q.to(torch.int64)
        assert int(codes.min()) >= -(2 ** (b - 1)) and int(codes.max()) <= 2 ** (b - 1) - 1
        if b == 2:
            assert len(torch.unique(codes)) <= 4
        shapes[tuple(codes.shape[::-1])] = b  # ONNX stores the MatMul weight as (in, out)
    # The ONNX artifact holds the same integer codes, not float weights.
    graph = onnx.load(str(out / "model.onnx")).graph
    seen = {}
    for init in graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.int8 and tuple(a.shape) in shapes:
            seen[tuple(a.shape)] = len(np.unique(a))
    assert set(seen) == set(shapes)
    for shape, b in shapes.items():
        assert seen[shape] <= 2**b
    assert not any(numpy_helper.to_array(i).dtype == np.float32 and tuple(i.dims) in shapes for i in graph.initializer)


def test_outputs_are_complete(outcome: tuple) -> None:
    results, _, out = outcome
    assert sorted(p.name for p in out.iterdir()) == [
        ".modelpress",
        "model-fp32.onnx",
        "model.onnx",
        "recipe.yaml",
        "results.json",
        "results.md",
    ]
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    assert "| medical-mixed (ONNX Runtime) |" in (out / "results.md").read_text()


@pytest.mark.parametrize("args", [["--threads", "0"], ["--threads", "two"], ["--bogus"]])
def test_bad_arguments_exit_2(usage_error: Callable[[list[str]], str], args: list[str]) -> None:
    err = usage_error(args)
    assert ("positive integer" in err) if "--threads" in args else ("unrecognized arguments" in err)


def test_bad_out_is_refused_and_left_untouched(refuses_bad_out: Callable[[], tuple[str, str]]) -> None:
    file_err, foreign_err = refuses_bad_out()
    assert "is a file" in file_err and "--overwrite" in foreign_err


def test_a_failed_run_leaves_nothing_behind(
    example: Any, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELPRESS_CACHE", str(cache))
    calls = []

    def export_then_fail(model: Any, inputs: Any, path: Path) -> Path:
        calls.append(path)
        if len(calls) == 2:  # the compressed model's export fails after the float one was written
            raise RuntimeError("disk full")
        return real_export(model, inputs, path)

    real_export = example.export_onnx
    monkeypatch.setattr(example, "export_onnx", export_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        example.run(tmp_path / "out", threads=1)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
