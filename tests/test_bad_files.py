"""Bad model and data files: each is exit 2 with a message naming it, never an internal error or a hang."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loading_factories import tiny_mlp
from modelpress.calibration import MIN_CALIBRATION_SAMPLES, check_calibration_size, load_calibration
from modelpress.cli import main
from modelpress.core.errors import BadInputError, DataError, ModelLoadError
from modelpress.loading import load_model, resolve
from modelpress.recipes.recipe import load_recipe

X = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _no_hang(seconds: int = 20) -> Iterator[None]:
    """Fail instead of blocking forever should anything open a FIFO."""

    def _fail(signum: int, frame: object) -> None:
        raise AssertionError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, _fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.npy"
    os.mkfifo(path)
    return path


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "sock.onnx"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        yield path


def _onnx(path: Path) -> Path:
    torch.onnx.export(tiny_mlp(), (X,), str(path), input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return path


# ---------------------------------------------------------------- special files


def test_fifo_socket_and_device_as_the_model(fifo: Path, unix_socket: Path, capsys: pytest.CaptureFixture) -> None:
    with _no_hang():
        for path, kind in ((fifo, "a named pipe (FIFO)"), (unix_socket, "a socket"), (Path("/dev/zero"), "device")):
            with pytest.raises(ModelLoadError) as exc:
                resolve(path)
            assert str(exc.value).startswith(f"model {path} is ") and kind in str(exc.value)
            assert main(["bench", str(path), "--no-quality"]) == 2
            assert "not a regular file or folder" in capsys.readouterr().err


def test_fifo_as_weights_data_and_eval_data(fifo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "out")
    with _no_hang():
        with pytest.raises(ModelLoadError, match="weights file .* is a named pipe"):
            load_model("loading_factories:tiny_mlp", weights=fifo)
        with pytest.raises(DataError, match="calibration data .* is a named pipe"):
            load_calibration(fifo)
        for argv in (
            ["bench", "loading_factories:tiny_mlp", "--weights", str(fifo), "--input-shape", "1,4"],
            ["bench", "digits-cnn", "--data", str(fifo)],
            ["compress", "digits-cnn", "-r", "int8-static", "--data", str(fifo), "--out", out],
            ["compress", "digits-cnn", "-r", "w8", "--eval-data", str(fifo), "--out", out],
            ["sensitivity", "digits-cnn", "--data", str(fifo)],
        ):
            assert main(argv) == 2, argv
            assert f"{fifo} is a named pipe (FIFO)" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_fifo_inside_a_model_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    os.mkfifo(tmp_path / "tokenizer.json")
    with _no_hang(), pytest.raises(ModelLoadError, match="tokenizer.json is a named pipe"):
        resolve(tmp_path)


# ---------------------------------------------------------------- model files


@pytest.mark.parametrize("metadata", ["{not json", '["session.set_denormal_as_zero"]', '{"a": {"b": 1}}'])
def test_onnx_with_malformed_session_metadata(tmp_path: Path, metadata: str, capsys: pytest.CaptureFixture) -> None:
    import onnx

    path = _onnx(tmp_path / "meta.onnx")
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="modelpress.ort_session_config", value=metadata)
    onnx.save(proto, str(path))
    with pytest.raises(ModelLoadError, match="metadata modelpress.ort_session_config"):
        resolve(path)
    assert main(["bench", str(path), "--no-quality"]) == 2
    assert "meta.onnx" in capsys.readouterr().err


def test_weights_for_several_factories_are_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tiny_mlp().state_dict().items()}, tmp_path / "w.safetensors")
    argv = ["bench", "digits-cnn", "--weights", str(tmp_path / "w.safetensors")]
    assert main(argv) == 2
    assert "--weights goes into one package.module:factory model; 0 of the models" in capsys.readouterr().err


def test_weights_option_loads_into_the_factory(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    other = tiny_mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "w.safetensors")
    out = tmp_path / "neg.onnx"
    argv = ["export", "loading_factories:tiny_mlp", "--weights", str(tmp_path / "w.safetensors")]
    assert main([*argv, "--input-shape", "1,4", "--out", str(out)]) == 0
    from modelpress.export.runtime import OnnxModel

    torch.testing.assert_close(OnnxModel(out)(X), other(X), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- data files


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Thing:
    """Not a tensor: saving it needs arbitrary pickle."""


def test_bad_calibration_files(tmp_path: Path) -> None:
    cases = {
        _write(tmp_path / "zero.npy", b""): "not a valid .npy file",
        _write(tmp_path / "garbage.npy", b"\x93NUMPY\x01\x00garbage"): "not a valid .npy file",
        _write(tmp_path / "garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"): "not a valid safe",
        _write(tmp_path / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1")): "is not UTF-8 text",
        _write(tmp_path / "truncated.pt", b"PK\x03\x04garbage"): "not a valid PyTorch file",
    }
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    cases[tmp_path / "objects.npy"] = "holds Python objects .it needs pickle.; a data file never needs code"
    torch.save([torch.zeros(2, 3), _Thing()], tmp_path / "pickled.pt")
    cases[tmp_path / "pickled.pt"] = "needs arbitrary pickle, .* save the tensors as .npy or .safetensors"
    from modelpress.zoo.text import FolderEntry

    entry = FolderEntry.__new__(FolderEntry)  # a text entry: .txt is accepted as far as decoding
    for path, fragment in cases.items():
        with pytest.raises(DataError, match=fragment) as exc:
            load_calibration(path, entry)
        assert path.name in str(exc.value)


def test_non_finite_calibration_values(tmp_path: Path) -> None:
    values = np.ones((20, 4), dtype=np.float32)
    values[3, 1], values[7, 2], values[9, 0] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "nan.npy", values)
    save_file({"a": torch.from_numpy(values), "b": torch.ones(20, 2)}, tmp_path / "nan.safetensors")
    for name in ("nan.npy", "nan.safetensors"):
        with pytest.raises(DataError, match=f"{name} holds 3 non-finite values"):
            load_calibration(tmp_path / name)


def test_zero_byte_and_non_finite_data_exit_2_on_every_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "zero.npy").write_bytes(b"")
    values = np.ones((32, 4), dtype=np.float32)
    values[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", values)
    onnx_model = _onnx(tmp_path / "tiny.onnx")
    out = str(tmp_path / "out")
    for model, data, fragment in (
        ("digits-cnn", "zero.npy", "zero.npy is not a valid .npy file"),
        (str(onnx_model), "nan.npy", "nan.npy holds 1 non-finite values"),
    ):
        assert main(["compress", model, "-r", "int8-static", "--data", str(tmp_path / data), "--out", out]) == 2
        assert fragment in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_calibration_set_too_small_for_the_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    few = [(torch.zeros(4, 4),), (torch.zeros(3, 4),)]
    for name in ("int8-static", "int8-smooth", "w4-gptq", "w4-awq"):
        with pytest.raises(DataError, match=f"holds 7 samples; recipe {name} .* at least {MIN_CALIBRATION_SAMPLES}"):
            check_calibration_size(few, load_recipe(name), "few.npy")
    for name in ("w8", "int8-dynamic", "w4"):  # no calibrated statistics: any amount will do
        check_calibration_size(few, load_recipe(name), "few.npy")
    check_calibration_size([(torch.zeros(MIN_CALIBRATION_SAMPLES, 4),)], load_recipe("int8-static"), "enough.npy")

    (tmp_path / "one_line.txt").write_text("A single sentence is not a calibration set.\n")
    argv = ["compress", "minilm", "--recipe", "int8-static", "--data", str(tmp_path / "one_line.txt")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.replace("\n", " ")
    assert "one_line.txt holds 1 sample; recipe int8-static calibrates int8 activation ranges" in message
    assert f"needs at least {MIN_CALIBRATION_SAMPLES}" in message and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- fuzzing


@functools.cache
def _valid_files() -> dict[str, bytes]:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).random((24, 4), dtype=np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.contiguous() for k, v in tiny_mlp().state_dict().items()}
        save_file(state, Path(tmp) / "w.safetensors")
        torch.save(state, Path(tmp) / "w.pt")
        _onnx(Path(tmp) / "m.onnx")
        files = {name: (Path(tmp) / name).read_bytes() for name in ("w.safetensors", "w.pt", "m.onnx")}
    return {"calib.npy": buffer.getvalue(), **files}


def _damage(data: bytes, truncate: int | None, flips: list[tuple[int, int]]) -> bytes:
    raw = bytearray(data if truncate is None else data[: truncate % max(len(data), 1)])
    for index, value in flips:
        if raw:
            raw[index % len(raw)] = value
    return bytes(raw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["calib.npy", "w.safetensors", "w.pt", "m.onnx"]),
    truncate=st.none() | st.integers(min_value=0, max_value=1 << 16),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=1 << 16), st.integers(0, 255)), max_size=6),
)
def test_damaged_files_load_or_raise_bad_input(name: str, truncate: int | None, flips: list[tuple[int, int]]) -> None:
    data = _damage(_valid_files()[name], truncate, flips)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        loaders = {
            "calib.npy": lambda: load_calibration(path),
            "w.safetensors": lambda: (load_calibration(path), load_model("loading_factories:tiny_mlp", weights=path)),
            "w.pt": lambda: load_model("loading_factories:tiny_mlp", weights=path),
            "m.onnx": lambda: resolve(path),
        }
        try:
            result = loaders[name]()
        except BadInputError as e:  # anything else (an internal error) fails the test
            assert str(e).strip(), "a refusal says what is wrong"
        else:
            assert result is not None  # the damage left a file that still reads


def test_api_calibration_batches_with_nan_or_too_few_samples_are_refused(tmp_path):
    """Batches given to `compress` directly (no file) are checked like --data, on the ONNX path too."""
    import torch

    from modelpress.core.errors import DataError
    from modelpress.export.artifact import export_artifact
    from modelpress.pipeline import compress

    graph = tmp_path / "mlp.onnx"
    export_artifact("loading_factories:tiny_mlp", graph, example_inputs=(torch.randn(2, 4),))
    nan = torch.randn(32, 4)
    nan[3, 1] = float("nan")
    with pytest.raises(DataError, match="holds 1 non-finite values"):
        compress(str(graph), "int8-static", [(nan[i : i + 8],) for i in range(0, 32, 8)], out_dir=tmp_path / "a")
    with pytest.raises(DataError, match="holds 4 samples.*needs at least 16"):
        compress(str(graph), "int8-static", [(torch.randn(4, 4),)], out_dir=tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]
