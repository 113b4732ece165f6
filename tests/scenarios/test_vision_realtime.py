"""Real-time vision scenario: `vision-realtime` on the MTCNN cascade and digits-cnn stays within tolerance.

Asserts on real data the quality tolerance the example states (`examples/vision-realtime/run.py`):
face / non-face accuracy of each MTCNN net drops by at most `FACE_ACC_TOL` on lfw_subset's test split,
the compressed cascade finds the fp32 cascade's faces (IoU >= 0.5, recall and precision >=
`DETECTION_MIN`), digit accuracy drops by at most `DIGITS_ACC_TOL`; and that the compressed nets hold
int8 weights, in eager form and in the ONNX file. Latency is measured by the example, not asserted here.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from modelpress.core.errors import ModelLoadError
from modelpress.export.onnx import export_onnx
from modelpress.export.runtime import OnnxModel
from modelpress.quant.modules import QConv, QLinear
from modelpress.recipes.recipe import load_recipe
from modelpress.zoo import mtcnn
from modelpress.zoo.base import get_entry

EXAMPLE = "vision-realtime"  # examples/vision-realtime/run.py, loaded by the `example` fixture (conftest.py)
HAS_WEIGHTS = importlib.util.find_spec("facenet_pytorch") is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason=f"MTCNN weights absent ({mtcnn.INSTALL})")
NETS = ("pnet", "rnet", "onet")


@pytest.fixture(scope="module")
def fp32() -> dict[str, nn.Module]:
    if not HAS_WEIGHTS:
        pytest.skip(f"MTCNN weights absent ({mtcnn.INSTALL})")
    return dict(zip(NETS, mtcnn.load_mtcnn(), strict=True))


@pytest.fixture(scope="module")
def compressed(example: Any, fp32: dict[str, nn.Module]) -> dict[str, nn.Module]:
    recipe = load_recipe(example.RECIPE)
    with torch.random.fork_rng(devices=[]):
        return {n: example.compress(f"mtcnn-{n}", m, recipe, threads=1)[0] for n, m in fp32.items()}


@pytest.fixture(scope="module")
def reference(fp32: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return {k: mtcnn.detect_faces(f, *fp32.values()).boxes for k, f in mtcnn.frames().items()}


@needs_weights
def test_fp32_cascade_finds_the_faces_and_only_them(reference: dict[str, torch.Tensor]) -> None:
    # astronaut and camera hold one face each, the grid 16; coffee, chelsea (a cat) and rocket none.
    assert {k: len(b) for k, b in reference.items()} == {
        "astronaut": 1,
        "camera": 1,
        "faces-grid": 16,
        "coffee": 0,
        "chelsea": 0,
        "rocket": 0,
    }
    # The astronaut's face (Eileen Collins) lies in the upper middle of the photo.
    x1, y1, x2, y2 = reference["astronaut"][0].tolist()
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 220
    # Every grid face is found in its own cell (4 x 4 cells of 125 pixels).
    cells = {(int((b[1] + b[3]) / 2 // 125), int((b[0] + b[2]) / 2 // 125)) for b in reference["faces-grid"]}
    assert cells == {(r, c) for r in range(4) for c in range(4)}


@needs_weights
def test_nets_tell_faces_from_non_faces(fp32: dict[str, nn.Module]) -> None:
    for net in NETS:
        entry = get_entry(f"mtcnn-{net}")
        quality = entry.evaluate(fp32[net])
        assert quality.details["n"] == 120 and quality.value >= 0.95, (net, quality)
    # A net that calls everything a face scores one half: the metric can fail.
    always_face = lambda x: torch.tensor([[0.0, 1.0]]).repeat(len(x), 1)  # noqa: E731
    assert get_entry("mtcnn-onet").evaluate(always_face).value == pytest.approx(0.5)


@needs_weights
def test_compressed_nets_keep_accuracy_and_detections(
    example: Any, fp32: dict[str, nn.Module], compressed: dict[str, nn.Module], reference: dict[str, torch.Tensor]
) -> None:
    for net in NETS:
        entry = get_entry(f"mtcnn-{net}")
        before, after = entry.evaluate(fp32[net]).value, entry.evaluate(compressed[net]).value
        assert after >= before - example.FACE_ACC_TOL, (net, before, after)
    with torch.inference_mode():
        found = {k: mtcnn.detect_faces(f, *compressed.values()).boxes for k, f in mtcnn.frames().items()}
    matched = sum(mtcnn.match_detections(reference[k], found[k]) for k in reference)
    recall = matched / sum(len(b) for b in reference.values())
    precision = matched / max(1, sum(len(b) for b in found.values()))
    assert recall >= example.DETECTION_MIN and precision >= example.DETECTION_MIN, (recall, precision)


@needs_weights
def test_compressed_nets_hold_int8_weights(compressed: dict[str, nn.Module], fp32: dict[str, nn.Module]) -> None:
    for net, model in compressed.items():
        layers = [m for m in fp32[net].modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        quantized = [m for m in model.modules() if isinstance(m, QConv | QLinear)]
        assert len(quantized) == len(layers), net  # every conv and linear layer
        for q in quantized:
            assert q.weight_q.dtype == torch.int8 and q.weight_scheme.bits == 8
            assert q.weight_scale.numel() == q.weight_q.shape[0]  # one scale per output channel


@needs_weights
def test_onnx_artifact_is_int8_and_within_tolerance(
    example: Any, fp32: dict[str, nn.Module], compressed: dict[str, nn.Module], tmp_path: Path
) -> None:
    entry = get_entry("mtcnn-onet")
    example_inputs = entry.example_inputs(2)
    float_path = export_onnx(fp32["onet"], example_inputs, tmp_path / "onet-fp32.onnx")
    int8_path = export_onnx(compressed["onet"], example_inputs, tmp_path / "onet.onnx")
    assert int8_path.stat().st_size < float_path.stat().st_size / 3
    graph = onnx.load(str(int8_path)).graph
    big = [numpy_helper.to_array(i) for i in graph.initializer if np.prod(i.dims) >= 1024]
    assert big and all(a.dtype == np.int8 for a in big)  # no large float weight left in the file
    before = entry.evaluate(fp32["onet"]).value
    assert entry.evaluate(OnnxModel(int8_path, threads=1)).value >= before - example.FACE_ACC_TOL


def test_digits_cnn_within_tolerance(example: Any, tmp_path: Path) -> None:
    entry = get_entry("digits-cnn")
    model = entry.load()
    q, _ = example.compress("digits-cnn", model, load_recipe(example.RECIPE), threads=1)
    before, after = entry.evaluate(model).value, entry.evaluate(q).value
    assert before >= 0.97 and after >= before - example.DIGITS_ACC_TOL
    path = export_onnx(q, entry.example_inputs(2), tmp_path / "digits.onnx")
    assert entry.evaluate(OnnxModel(path, threads=1)).value >= before - example.DIGITS_ACC_TOL
    assert path.stat().st_size < export_onnx(model, entry.example_inputs(2), tmp_path / "f.onnx").stat().st_size / 3


def test_missing_weights_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mtcnn.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps facenet-pytorch==2\.6\.0"):
        get_entry("mtcnn-onet").load()


def test_nms_and_matching() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert mtcnn.nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert mtcnn.match_detections(boxes[:3], boxes[[2, 0]]) == 2
    assert mtcnn.match_detections(boxes[:1], boxes[2:3]) == 0


@pytest.mark.parametrize("args", [["--threads", "0"], ["--repeats", "x"], ["--bogus"]])
def test_bad_arguments_exit_2(usage_error: Callable[[list[str]], str], args: list[str]) -> None:
    err = usage_error(args)
    assert ("positive integer" in err) if args[0] != "--bogus" else ("unrecognized arguments" in err)


def test_bad_out_is_refused_and_left_untouched(refuses_bad_out: Callable[[], tuple[str, str]]) -> None:
    file_err, foreign_err = refuses_bad_out()
    assert "is a file" in file_err and "--overwrite" in foreign_err


def test_a_failed_run_leaves_nothing_behind(example: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def export_then_fail(recipe: Any, folder: Path, threads: int, repeats: int) -> dict:
        folder.mkdir(parents=True)
        (folder / "pnet.onnx").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(example, "run_mtcnn", export_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        example.run(tmp_path / "out", threads=1)
    assert list(tmp_path.iterdir()) == []


@needs_weights
@pytest.mark.slow
def test_example_end_to_end(example: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = example.run(out, threads=1, repeats=3)
    for part in ("mtcnn", "digits"):
        rows = results[part]["rows"]
        assert all(r["within_tolerance"] for r in rows), [r["model"] for r in rows if not r["within_tolerance"]]
        assert results[part]["verdict"]["chosen"].startswith(example.RECIPE)
    m = {r["model"]: r for r in results["mtcnn"]["rows"]}
    assert m["vision-realtime (ONNX Runtime)"]["size_bytes"] < m["fp32 (ONNX Runtime)"]["size_bytes"] / 3
    assert json.loads((out / "results.json").read_text())["example"] == "vision-realtime"
    assert {p.name for p in out.iterdir()} == {"mtcnn", "digits", "recipe.yaml", "results.json", "results.md"}
