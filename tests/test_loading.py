from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loading_factories import tiny_mlp
from modelpress.core import ModelLoadError, UnsafePickleError, UntrustedCodeError
from modelpress.export.runtime import OnnxModel
from modelpress.loading import load_model, resolve

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def reference() -> nn.Module:
    return tiny_mlp().eval()


def test_factory_spec(reference):
    loaded = resolve("loading_factories:tiny_mlp")
    assert loaded.kind == "factory" and loaded.name == "tiny_mlp"
    torch.testing.assert_close(loaded.model(X), reference(X))


def test_factory_with_safetensors_weights(tmp_path, reference):
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "w.safetensors")
    model = load_model("loading_factories:tiny_mlp", weights=tmp_path / "w.safetensors")
    torch.testing.assert_close(model(X), other(X))


def test_factory_with_weights_that_do_not_fit(tmp_path):
    save_file({"0.weight": torch.zeros(2, 2)}, tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match="do not fit the model"):
        load_model("loading_factories:tiny_mlp", weights=tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("loading_factories:missing", "has no callable 'missing'"),
        ("loading_factories:not_a_module", "returned str, expected a torch.nn.Module"),
        ("bert-huge", "not a zoo name either; zoo: breast-cancer, digits-cnn, efficientnet-lite0, minilm"),
        ("/nonexistent/model.onnx", "no such file or folder"),
        ("", "empty model spec"),
    ],
)
def test_bad_specs_are_clear_errors(spec, fragment):
    with pytest.raises(ModelLoadError) as exc:
        resolve(spec)
    assert fragment in str(exc.value)


def test_onnx_file(tmp_path, reference):
    path = tmp_path / "m.onnx"
    torch.onnx.export(tiny_mlp(), (X,), str(path), input_names=["x"], dynamo=False)
    loaded = resolve(path)
    assert loaded.kind == "onnx" and isinstance(loaded.model, OnnxModel)
    torch.testing.assert_close(loaded.model(X), reference(X), atol=1e-5, rtol=1e-5)


def test_corrupt_onnx_file(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x00not an onnx model at all")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        resolve(path)


def test_torch_export_program(tmp_path, reference):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (X,)), str(path))
    with pytest.raises(UntrustedCodeError, match="is a torch.export program: loading it unpickles"):
        resolve(path)
    loaded = resolve(path, trust_code=True)
    assert loaded.kind == "torch-export"
    torch.testing.assert_close(loaded.model(X), reference(X))


def test_torchscript_archive(tmp_path, reference):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(tiny_mlp(), (X,)), str(path))
    with pytest.raises(UntrustedCodeError, match="is a TorchScript archive"):
        resolve(path)
    loaded = resolve(path, trust_code=True)
    assert loaded.kind == "torchscript"
    torch.testing.assert_close(loaded.model(X), reference(X))


def test_pickled_module_needs_trust(tmp_path, reference):
    path = tmp_path / "full.pt"
    torch.save(tiny_mlp(), str(path))
    with pytest.raises(UnsafePickleError, match="--trust-code"):
        resolve(path)
    loaded = resolve(path, trust_code=True)
    assert loaded.kind == "pickle"
    torch.testing.assert_close(loaded.model(X), reference(X))
    with pytest.warns(DeprecationWarning, match="trust_pickle is deprecated"):
        assert resolve(path, trust_pickle=True).kind == "pickle"  # the old name means the same


def test_state_dict_file_asks_for_architecture(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny_mlp().state_dict(), str(path))
    with pytest.raises(ModelLoadError, match="holds a state dict, not a model.*package.module:factory"):
        resolve(path)
    model = load_model("loading_factories:tiny_mlp", weights=path)  # weights_only load is fine
    assert isinstance(model, nn.Module)


def test_corrupt_and_unknown_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot read"):
        resolve(bad)
    weights = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, weights)
    with pytest.raises(ModelLoadError, match="holds weights only"):
        resolve(weights)
    odd = tmp_path / "model.xyz"
    odd.write_text("?")
    with pytest.raises(ModelLoadError, match="cannot tell what kind of model"):
        resolve(odd)
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match="neither a Hugging Face model"):
        resolve(empty_dir)
    bad_pt2 = tmp_path / "bad.pt2"
    bad_pt2.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a valid .pt2"):
        resolve(bad_pt2)


def test_weights_only_for_factories(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot be combined with the zoo model"):
        resolve("digits-cnn", weights=tmp_path / "w.safetensors")


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torch._inductor import aoti_compile_and_package

    program = torch.export.export(tiny_mlp(), (X,))
    return Path(aoti_compile_and_package(program, package_path=str(tmp_path_factory.mktemp("aoti") / "m.pt2")))


def test_aoti_package(aoti_package, reference):
    from modelpress.export.runtime import AotiModel

    with pytest.raises(UntrustedCodeError, match="is an AOTInductor package: loading it runs the compiled library"):
        resolve(aoti_package)
    loaded = resolve(aoti_package, trust_code=True)
    assert loaded.kind == "aoti" and isinstance(loaded.model, AotiModel)
    torch.testing.assert_close(loaded.model(X), reference(X), atol=1e-5, rtol=1e-5)


def test_aoti_package_leaves_nothing_in_the_temporary_directory(aoti_package, reference, tmp_path, monkeypatch):
    from modelpress.export.runtime import AotiModel

    # torch's C++ loader unpacks the package (library, sources) into TMPDIR/aotinductor_XXXXXX
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = AotiModel(aoti_package)
    assert list(tmp_path.iterdir()) == []  # unpacked, loaded and removed
    assert os.environ["TMPDIR"] == str(tmp_path)
    torch.testing.assert_close(model(X), reference(X), atol=1e-5, rtol=1e-5)  # runs from the unlinked library
    del model
    assert list(tmp_path.iterdir()) == []


def test_aoti_package_leaves_nothing_behind_a_killed_process(aoti_package, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    # The speed gate kills a child that overruns its limit (SIGKILL: no destructors run).
    code = (
        "import sys, time; from modelpress.core.runtime import AotiModel; "
        "model = AotiModel(sys.argv[1]); print('ready', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": cache_dir()}
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(aoti_package)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert list(tmp_path.iterdir()) == []


def test_onnx_inputs_are_derived_from_the_graph(tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(tiny_mlp(), (X,), str(path), input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    loaded = resolve(path)
    assert loaded.entry is not None and not loaded.entry.has_quality
    (inputs,) = loaded.entry.example_inputs(7)
    assert inputs.shape == (7, 4) and inputs.dtype == torch.float32
    assert loaded.model(inputs).shape == (7, 3)


def test_export_program_keeps_its_example_shapes(tmp_path):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (X,)), str(path))
    entry = resolve(path, trust_code=True).entry
    assert entry is not None and entry.example_inputs(5)[0].shape == (5, 4)


def test_factory_that_raises_names_the_factory_and_the_error(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"factory 'loading_factories:raises' raised ValueError: no such width"):
        resolve("loading_factories:raises")
    (tmp_path / "broken_factory_module.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="raised RuntimeError: half-written module"):
        resolve("broken_factory_module:build")


def test_weights_file_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"model": tiny_mlp()}, str(path))  # a pickled module inside: needs arbitrary pickle
    with pytest.raises(UnsafePickleError, match="full.pt is a pickle"):
        load_model("loading_factories:tiny_mlp", weights=path)


def test_a_zoo_model_resolved_with_a_cache_dir_is_trained_into_it_and_read_back(tmp_path, monkeypatch):
    from modelpress.zoo import breast_cancer

    default = tmp_path / "default-cache"
    monkeypatch.setenv("MODELPRESS_CACHE", str(default))
    cache = tmp_path / "given-cache"
    first = resolve("breast-cancer", cache_dir=cache).model
    (saved,) = (cache / "breast-cancer").glob("*.safetensors")
    assert not default.exists()

    def no_training(*_args, **_kw):
        raise AssertionError("trained again instead of reading the given cache dir")

    monkeypatch.setattr(breast_cancer, "train_breast_cancer_mlp", no_training)
    again = resolve("breast-cancer", cache_dir=cache).model
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert list((cache / "breast-cancer").glob("*.safetensors")) == [saved] and not default.exists()
