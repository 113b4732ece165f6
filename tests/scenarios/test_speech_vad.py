"""Speech scenario: `speech-ondevice` keeps silero-vad's decisions on real synthesized speech in noise.

Runs `examples/speech-vad/run.py` on espeak-ng speech at two SNRs and asserts the recipe's promise
for the eager model and its ONNX artifact: at least `AGREEMENT_TOL` of the 32 ms frames decided as
by the fp32 model (`AGREEMENT_TOL_PER_SNR` at each SNR), and F1 against the ground-truth speech
segments within `F1_TOL`; that the model really holds int8 codes and its artifact is smaller; and
that the speech data are what they claim (segments, SNR, noise colour). Without espeak-ng these
tests skip, except in CI, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from modelpress.core.errors import DataError
from modelpress.quant import QLinear
from modelpress.zoo import speech_data
from modelpress.zoo.base import get_entry
from modelpress.zoo.speech_data import espeak_available, synthesize_speech

if importlib.util.find_spec("silero_vad") is None:
    pytest.skip("silero-vad is not installed", allow_module_level=True)

EXAMPLE = "speech-vad"  # examples/speech-vad/run.py, loaded by the `example` fixture (conftest.py)
AGREEMENT_TOL = 0.99  # fraction of frames whose speech decision matches fp32's, over all the audio
AGREEMENT_TOL_PER_SNR = 0.985  # ... and at each SNR (down to 0 dB, where many frames sit near the threshold)
F1_TOL = 0.01  # F1 against the ground truth may drop by at most this much
SNRS = (10.0, 0.0)

pytestmark = pytest.mark.usefixtures("one_thread", "cache_dir")


@pytest.fixture(scope="module")
def espeak() -> None:
    if not espeak_available():
        if os.environ.get("CI") == "true":
            pytest.fail("espeak-ng is not installed; CI needs it (.ci/run installs it)")
        pytest.skip("espeak-ng is not installed")


@pytest.fixture(scope="module")
def outcome(
    espeak: None, example: Any, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, torch.nn.Module, Path]:
    out = tmp_path_factory.mktemp("speech-vad") / "out"
    results, compressed = example.run(out, threads=1, snrs=SNRS, seconds=20.0, repeats=1)
    return results, compressed, out


def _rows(results: dict) -> dict[str, dict]:
    return {r["model"]: r for r in results["rows"]}


def test_speech_clip_segments_and_snr(espeak: None, cache_dir: Path) -> None:
    clip = synthesize_speech(20.0, seed=7, snr_db=0.0, noise="white")
    assert clip.wav.shape == (320000,) and clip.wav.dtype == torch.float32
    assert len(clip.segments) >= 3 and all(0 <= s < e <= 320000 for s, e in clip.segments)
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(clip.segments, clip.segments[1:], strict=False))  # pauses between
    speech = clip.sample_labels()
    assert 0.3 < float(speech.float().mean()) < 0.85
    # At 0 dB, speech plus noise over the segments has twice the power of the noise alone in the pauses.
    ratio = float(clip.wav[speech].pow(2).mean() / clip.wav[~speech].pow(2).mean())
    assert 10 * math.log10(ratio) == pytest.approx(10 * math.log10(2.0), abs=0.5)
    labels = clip.frame_labels(512)
    assert labels.shape == (625,) and labels.any() and not labels.all()
    # Deterministic: the cached clip, and one synthesized afresh, are the same audio.
    again = synthesize_speech(20.0, seed=7, snr_db=0.0, noise="white", cache_dir=cache_dir / "fresh")
    assert torch.equal(again.wav, clip.wav) and again.segments == clip.segments
    other = synthesize_speech(20.0, seed=8, snr_db=0.0, noise="white")
    assert other.segments != clip.segments


def test_noise_colours() -> None:
    rng = np.random.default_rng(0)
    slopes = {}
    for kind in speech_data.NOISES:
        x = speech_data.colored_noise(1 << 16, kind, rng)
        assert np.sqrt(np.mean(x**2)) == pytest.approx(1.0, rel=1e-6)
        power = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(len(x), 1 / 16000)
        low, high = power[(f > 100) & (f < 200)].mean(), power[(f > 3200) & (f < 6400)].mean()
        slopes[kind] = 10 * math.log10(low / high) / math.log2(32)  # dB per octave, 150 Hz -> 4.8 kHz
    assert slopes["white"] == pytest.approx(0.0, abs=1.0)
    assert slopes["pink"] == pytest.approx(3.0, abs=1.0)
    assert slopes["brown"] == pytest.approx(6.0, abs=1.0)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"noise": "purple"}, "noise must be one of white, pink, brown"),
        ({"snr_db": 200.0}, "snr_db must be in [-20, 80]"),
        ({"seconds": 1.0}, "seconds must be in [10, 3600]"),
        ({"seconds": float("nan")}, "seconds must be in [10, 3600]"),
    ],
)
def test_bad_speech_parameters_name_the_problem(kwargs: dict, fragment: str) -> None:
    with pytest.raises(DataError) as exc:
        synthesize_speech(**kwargs)
    assert fragment in str(exc.value)


def test_missing_espeak_is_a_clear_error_and_the_zoo_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speech_data, "ESPEAK", "espeak-ng-not-installed")
    with pytest.raises(DataError, match="espeak-ng, which was not found on PATH.*apt-get install espeak-ng"):
        synthesize_speech(20.0)
    entry = get_entry("silero-vad")
    quality = entry.evaluate(entry.load())
    assert quality.value == 1.0 and quality.details["audio_source"] == "synthetic"
    assert "espeak-ng is not installed" in quality.details["audio"]


def test_zoo_evaluates_on_real_speech(espeak: None) -> None:
    entry = get_entry("silero-vad")
    model = entry.load()
    quality = entry.evaluate(model)
    assert quality.details["audio_source"] == "espeak-ng" and "pink noise at 10 dB SNR" in quality.details["audio"]
    assert quality.value == 1.0 and quality.details["f1"] > 0.9  # the detector works on this audio
    validation = entry.validation_quality(model)
    assert validation is not None and validation.details["audio"] != quality.details["audio"]


def test_agreement_and_f1_within_tolerance(outcome: tuple) -> None:
    results, _, _ = outcome
    rows = _rows(results)
    fp32 = rows["fp32 (PyTorch eager)"]
    assert fp32["agreement"] == 1.0 and fp32["f1"] > 0.9 and fp32["n_frames"] == 2 * 625
    assert rows["fp32 (ONNX Runtime)"]["agreement"] == 1.0
    for label in ("speech-ondevice (PyTorch eager)", "speech-ondevice (ONNX Runtime)"):
        got = rows[label]
        assert got["agreement"] >= AGREEMENT_TOL, label
        assert got["f1"] >= fp32["f1"] - F1_TOL, label
        for snr in ("10", "0"):
            assert got["per_snr"][snr]["agreement"] >= AGREEMENT_TOL_PER_SNR, (label, snr)
            assert got["per_snr"][snr]["f1"] >= fp32["per_snr"][snr]["f1"] - F1_TOL, (label, snr)
        assert got["max_abs_prob_diff"] > 0  # it is a different model, not the float one
        assert 0 < got["rtf"] < 1  # faster than real time; speed targets live in benchmarks/, not here


def test_model_is_int8_and_smaller(outcome: tuple) -> None:
    results, compressed, out = outcome
    rows = _rows(results)
    assert set(results["bits"]["speech-ondevice"].values()) == {8}
    for name in ("lstm_cell.ih", "lstm_cell.hh"):
        layer = compressed.get_submodule(name)
        assert isinstance(layer, QLinear) and layer.weight_q.dtype == torch.int8
    assert compressed.get_submodule("conv1").weight_q.dtype == torch.int8
    fp32_onnx, q_onnx = rows["fp32 (ONNX Runtime)"], rows["speech-ondevice (ONNX Runtime)"]
    assert q_onnx["size_bytes"] < 0.3 * fp32_onnx["size_bytes"]
    assert rows["speech-ondevice (PyTorch eager)"]["size_bytes"] < 0.3 * rows["fp32 (PyTorch eager)"]["size_bytes"]
    # The artifact stores the weights as int8 codes: nearly all of silero-vad's 309,633 parameters.
    graph = onnx.load(str(out / "model.onnx")).graph
    int8 = sum(numpy_helper.to_array(i).size for i in graph.initializer if i.data_type == onnx.TensorProto.INT8)
    floats = sum(numpy_helper.to_array(i).size for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    assert int8 >= 300_000 and floats < 5_000
    assert q_onnx["size_bytes"] == (out / "model.onnx").stat().st_size


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
    text = (out / "results.md").read_text()
    assert "| speech-ondevice (ONNX Runtime) |" in text and "0 dB: agreement / F1" in text
    assert results["audio"]["snr_db"] == list(SNRS) and len(results["audio"]["clips"]) == 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--threads", "0"], "positive integer"),
        (["--snr", "ten"], "SNRs in dB separated by commas"),
        (["--snr", "10,200"], "each SNR must be in [-20, 80] dB, got 200"),
        (["--seconds", "3"], "seconds in [10, 600]"),
        (["--noise", "purple"], "invalid choice: 'purple'"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2(usage_error: Callable[[list[str]], str], args: list[str], fragment: str) -> None:
    assert fragment in usage_error(args)


def test_bad_out_and_missing_espeak_are_refused_and_leave_nothing(
    refuses_bad_out: Callable[[], tuple[str, str]],
    example: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    file_err, foreign_err = refuses_bad_out()  # leaves results.txt and theirs/ in tmp_path
    assert "is a file" in file_err and "--overwrite" in foreign_err
    monkeypatch.setattr(speech_data, "ESPEAK", "espeak-ng-not-installed")
    assert example.main(["--out", str(tmp_path / "new")]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt", "theirs"]


def test_a_failed_run_leaves_nothing_behind(
    espeak: None, example: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def export_then_fail(model: Any, inputs: Any, path: Path, **kwargs: Any) -> Path:
        calls.append(path)
        if len(calls) == 2:  # the compressed model's export fails after the float one was written
            raise RuntimeError("disk full")
        return real_export(model, inputs, path, **kwargs)

    real_export = example.export_onnx
    monkeypatch.setattr(example, "export_onnx", export_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        example.run(tmp_path / "out", threads=1, snrs=(10.0,), seconds=10.0, repeats=1)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
