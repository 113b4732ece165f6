from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelpress.cli import main


def test_help_lists_commands_with_examples(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("bench", "demo", "compress", "export", "recipes", "zoo"):
        assert command in text
    assert main(["bench", "--help"]) == 0
    assert "modelpress bench minilm digits-cnn" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "/no/such/model.onnx"], "no such file or folder"),
        (["bench", "not-a-zoo-model"], "not a zoo name either"),
        (["bench", "digits-cnn", "--batch-sizes", "0,x"], "--batch-sizes must be comma-separated positive"),
        (["bench", "digits-cnn", "--data", "/no/such/dir"], "--data /no/such/dir: no such file or folder"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, argv, fragment):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err.replace("\n", " ")


def test_usage_error_exits_2(capsys):
    assert main(["bench", "--bogus-option"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_export_onnx_and_pt2_pass_the_parity_gate(capsys, tmp_path, cache_dir):
    import json

    for name in ("digits.onnx", "digits.pt2"):
        assert main(["export", "digits-cnn", "--out", str(tmp_path / name), "--json"]) == 0
        parity = json.loads(capsys.readouterr().out)
        assert parity["artifact"].endswith(name) and (tmp_path / name).stat().st_size > 0
        # fp32 ONNX: same function; .pt2: float ops in bf16
        assert parity["max_abs"] <= (1e-4 if name.endswith(".onnx") else 0.1), parity
        assert parity["mean_cosine"] > 0.999


def test_export_needs_known_inputs_and_a_known_suffix(capsys, tmp_path):
    assert main(["export", "loading_factories:tiny_mlp", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["export", "digits-cnn", "--out", str(tmp_path / "m.tflite")]) == 2
    assert "must end in .onnx or .pt2" in capsys.readouterr().err
    argv = ["export", "loading_factories:tiny_mlp", "--input-shape", "1,4", "--out", str(tmp_path / "m.onnx")]
    assert main(argv) == 0
    assert "mean cosine 1.000000" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing else left behind


def test_zoo_lists_entries(capsys):
    assert main(["zoo"]) == 0
    text = capsys.readouterr().out
    assert "minilm" in text and "digits-cnn" in text and "silero-vad" in text


def test_bench_json_has_measured_figures(capsys, tmp_path, cache_dir):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "digits-cnn",
        "-b",
        "1,8",
        "--repeats",
        "5",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed["models"] == written["models"]
    (model,) = written["models"]
    assert model["name"] == "digits-cnn"
    assert set(model["latency_ms"]) == {"1", "8"}
    assert 0 < model["latency_ms"]["1"]["p50"] <= model["latency_ms"]["1"]["p90"]
    assert model["params"] > 10_000 and model["size_bytes"] > 4 * model["params"] * 0.9
    assert model["quality"]["name"] == "accuracy" and model["quality"]["value"] >= 0.97
    assert written["environment"]["threads"] == 1


def _export_tiny(tmp_path):
    from loading_factories import tiny_mlp

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        tiny_mlp(),
        (torch.randn(2, 4),),
        str(path),
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
        dynamo=False,
    )
    return path


def test_bench_onnx_and_factory_with_input_shape(capsys, tmp_path, monkeypatch):
    path = _export_tiny(tmp_path)
    argv = [
        "bench",
        str(path),
        "loading_factories:tiny_mlp",
        "--input-shape",
        "1,4",
        "-b",
        "1,3",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--json",
    ]
    assert main(argv) == 0
    onnx_stats, torch_stats = json.loads(capsys.readouterr().out)["models"]
    assert onnx_stats["name"] == "tiny.onnx" and onnx_stats["params"] == torch_stats["params"] == 67
    assert onnx_stats["size_bytes"] == path.stat().st_size
    for stats in (onnx_stats, torch_stats):
        assert set(stats["latency_ms"]) == {"1", "3"} and stats["quality"] is None


def test_bench_a_model_that_cannot_take_the_batch_size(capsys, tmp_path):
    from loading_factories import tiny_mlp

    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (torch.randn(2, 4),)), str(path))
    assert main(["bench", str(path), "-b", "3", "--repeats", "2", "--trust-code"]) == 2
    assert "cannot run on inputs of shape (3, 4) (batch size 3)" in capsys.readouterr().err


def test_sensitivity_lists_every_layer_most_sensitive_first(capsys, cache_dir):
    import json

    assert main(["sensitivity", "digits-cnn", "--recipe", "w4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    drops = [r["drop"] for r in result["rows"]]
    # w4 is group-wise: only the Linear classifier is a candidate (the convolutions have no groups)
    assert [r["layer"] for r in result["rows"]] == ["classifier"] and drops[0] > 0
    assert result["baseline"] == pytest.approx(1.0)
    assert main(["sensitivity", "digits-cnn", "--metric", "speed"]) == 2
    assert "--metric must be fidelity or task" in capsys.readouterr().err


def test_ctrl_c_mid_run_leaves_no_output(tmp_path: Path) -> None:
    """SIGINT while the artifacts are being written: exit 130, a message, and no folder or partial left."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "modelpress.cli", "compress", "digits-cnn", "--recipe", "int8-static",
           "--out", str(out), "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*.partial")):  # the temporary output folder exists: work is under way
        assert proc.poll() is None and time.monotonic() < deadline, "compress ended before it was interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr
    assert list(tmp_path.iterdir()) == []


def test_compress_a_factory_model_with_its_input_shape(tmp_path, capsys):
    out = tmp_path / "mlp"
    args = ["compress", "loading_factories:tiny_mlp", "--recipe", "int8-dynamic", "--out", str(out)]
    args += ["--threads", "1", "--batch-sizes", "1", "--json"]
    assert main(args) == 2  # inputs unknown: nothing to export or time
    assert "--input-shape" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--input-shape", "1,5"]) == 2  # does not fit the model's first Linear (4 inputs)
    err = capsys.readouterr().err
    assert "--input-shape 1,5 does not fit loading_factories:tiny_mlp" in err and not out.exists()
    assert main([*args, "--input-shape", "1,x"]) == 2
    assert "comma-separated positive integers" in capsys.readouterr().err
    assert main([*args, "--input-shape", "1,4", "--keep-slower"]) == 0  # too small to gain from int8
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.onnx").exists() and report["baseline"]["latency_ms"]["1"]["p50"] > 0
    capsys.readouterr()
    argv = ["compress", "digits-cnn", "--recipe", "w8", "--input-shape", "1,4", "--out", str(tmp_path / "d")]
    assert main(argv) == 2
    assert "brings its own inputs" in capsys.readouterr().err
