from __future__ import annotations

import json

import pytest

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


@pytest.mark.parametrize("command", ["compress", "export", "recipes"])
def test_unavailable_commands_say_so(capsys, command):
    assert main([command]) == 1
    assert "not available in this release yet" in capsys.readouterr().err


def test_zoo_lists_entries(capsys):
    assert main(["zoo"]) == 0
    text = capsys.readouterr().out
    assert "minilm" in text and "digits-cnn" in text and "silero-vad" in text


def test_bench_json_has_measured_figures(capsys, tmp_path, cache_dir):
    out = tmp_path / "bench.json"
    argv = ["bench", "digits-cnn", "-b", "1,8", "--repeats", "5", "--warmup", "1", "--threads", "1",
            "--json", "--out", str(out)]
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
