"""Hostile files: each would run code when loaded; without --trust-code nothing of it runs.

Every payload creates a sentinel file when it runs. Each case checks that the command exits 2
with a message naming the file and --trust-code, and that the sentinel does not exist; where it is
cheap, a control shows the payload is real (the sentinel appears once the raw loader opens the file).
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress.cli import main
from modelpress.core.errors import ModelLoadError, UnsafePickleError, UntrustedCodeError
from modelpress.loading import resolve


class Payload:
    """Unpickling this opens (creates) the sentinel file: `open(sentinel, "w")`."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.sentinel, "w"))


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "SENTINEL"


def _refused_by_the_cli(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main(["bench", str(path), "--no-quality", *extra]) == 2
    message = capsys.readouterr().err.replace("\n", " ")
    assert path.name in message and "--trust-code" in message, message
    return message


def _refused_everywhere(path: Path, fragment: str, sentinel: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Refused by the CLI (exit 2, the message naming `fragment`) and by `resolve`; the payload never ran.

    Returns the CLI's message."""
    message = _refused_by_the_cli(path, capsys)
    assert fragment in message
    with pytest.raises(UntrustedCodeError):
        resolve(path)
    assert not sentinel.exists()
    return message


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_pickle_payload(tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "model.pkl"
    plain.write_bytes(pickle.dumps(Payload(sentinel), protocol=4))
    saved = tmp_path / "model.pt"
    torch.save(Payload(sentinel), saved)
    for path in (plain, saved):
        message = _refused_by_the_cli(path, capsys)
        assert "is a pickle of arbitrary Python objects: loading it unpickles them" in message
        with pytest.raises(UnsafePickleError):
            resolve(path)
    assert main(["bench", "loading_factories:tiny_mlp", "--weights", str(saved), "--no-quality"]) == 2
    assert "model.pt is a pickle" in capsys.readouterr().err.replace("\n", " ")
    assert not sentinel.exists()
    with pytest.raises(ModelLoadError, match="holds TextIOWrapper, not a model"):  # trusted: the payload runs
        resolve(saved, trust_code=True)
    assert sentinel.exists()


def test_trusted_pickle_of_a_module_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "linear.pt"
    torch.save(nn.Linear(4, 2), path)
    _refused_by_the_cli(path, capsys)
    assert main(["bench", str(path), "--no-quality", "--trust-code", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["params"] == 10
    assert main(["bench", str(path), "--no-quality", "--trust-pickle", "--json"]) == 0  # the deprecated name
    assert "--trust-pickle is deprecated; use --trust-code" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the hostile shared library")
def test_aotinductor_package_with_a_hostile_library(
    tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "evil.c"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void run(void) {\n"
        f'  FILE *f = fopen("{sentinel}", "w"); if (f) fclose(f);\n'
        "}\n"
    )
    library = tmp_path / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    path = _zip(
        tmp_path / "model.pt2",
        {
            "model/archive_format": b"pt2",
            "model/data/aotinductor/model/evil.so": library.read_bytes(),
            "model/data/aotinductor/model/evil.cpp": b"",
        },
    )
    what = "model.pt2 is an AOTInductor package: loading it runs the compiled library inside it; refused."
    _refused_everywhere(path, what, sentinel, capsys)
    import ctypes

    ctypes.CDLL(str(library))  # control: the library's constructor really writes the sentinel
    assert sentinel.exists()


def _hostile_export(tmp_path: Path, sentinel: Path) -> Path:
    """A real torch.export program of nn.Linear whose first weight is stored as a pickle: the payload."""
    real = tmp_path / "real.pt2"
    torch.export.save(torch.export.export(nn.Linear(4, 2), (torch.randn(2, 4),)), str(real))
    members = {}
    with zipfile.ZipFile(real) as archive:
        for name in archive.namelist():
            members[name] = archive.read(name)
    config_name = next(n for n in members if n.endswith("model_weights_config.json"))
    config = json.loads(members[config_name])
    entry = config["config"]["weight"]
    entry["use_pickle"] = True
    buffer = io.BytesIO()
    torch.save(Payload(sentinel), buffer)
    members[config_name.replace("model_weights_config.json", entry["path_name"])] = buffer.getvalue()
    members[config_name] = json.dumps(config).encode()
    return _zip(tmp_path / "program.pt2", members)


def test_torch_export_program_with_a_pickled_payload(
    tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _hostile_export(tmp_path, sentinel)
    what = "program.pt2 is a torch.export program: loading it unpickles parts of the archive"
    _refused_everywhere(path, what, sentinel, capsys)
    try:  # control: torch.export.load unpickles the payload
        torch.export.load(str(path))
    except Exception:
        pass
    assert sentinel.exists()


def test_real_torch_export_program_loads_when_trusted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    linear = nn.Linear(4, 2).eval()
    x = torch.randn(3, 4)
    path = tmp_path / "linear.pt2"
    torch.export.save(torch.export.export(linear, (x,)), str(path))
    _refused_by_the_cli(path, capsys)
    loaded = resolve(path, trust_code=True)
    assert loaded.kind == "torch-export"
    torch.testing.assert_close(loaded.model(x), linear(x))
    argv = ["bench", str(path), "--no-quality", "--trust-code", "-b", "3", "--repeats", "2", "--warmup", "1"]
    assert main(argv) == 0


def test_torchscript_shaped_archive(tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = pickle.dumps(Payload(sentinel), protocol=2)
    path = _zip(
        tmp_path / "scripted.pt",
        {
            "scripted/data.pkl": payload,
            "scripted/constants.pkl": payload,
            "scripted/code/__torch__/evil.py": b"import os\n",
            "scripted/version": b"3\n",
        },
    )
    message = _refused_everywhere(path, "scripted.pt is a TorchScript archive", sentinel, capsys)
    assert "--trust-code" in message  # the refusal names the flag that would allow it
    with zipfile.ZipFile(path) as archive:  # the payload is really there, unopened
        assert archive.read("scripted/data.pkl") == payload
    assert not sentinel.exists()


def _code_writing(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()\n"


def test_hugging_face_folder_with_custom_code(
    tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "custom-bert"
    folder.mkdir()
    config = {
        "model_type": "bert",
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "vocab_size": 10,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(_code_writing(sentinel))
    (folder / "modeling_evil.py").write_text(_code_writing(sentinel))
    (folder / "model.safetensors").write_bytes(b"")
    message = _refused_by_the_cli(folder, capsys)
    code = "(auto_map: configuration_evil.py, modeling_evil.py)"
    assert f"config.json is a Hugging Face model with custom code {code}" in message
    assert "loading it imports that Python code" in message
    with pytest.raises(UntrustedCodeError, match="config.json"):
        resolve(folder)
    assert not sentinel.exists()


def test_hugging_face_folder_with_a_custom_tokenizer(tmp_path: Path, sentinel: Path) -> None:
    folder = tmp_path / "custom-tokenizer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok_evil.Tok", None]}}))
    (folder / "tok_evil.py").write_text(_code_writing(sentinel))  # no weights either: code is refused first
    with pytest.raises(UntrustedCodeError, match=r"tokenizer_config.json is a .* custom code \(auto_map: tok_evil.py"):
        resolve(folder)
    assert not sentinel.exists()


def test_sentence_transformers_folder_with_a_custom_module(
    tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "custom-st"
    folder.mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "custom_st.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "custom_st.py").write_text(_code_writing(sentinel))
    message = _refused_by_the_cli(folder, capsys)
    assert "modules.json is a sentence-transformers model with custom modules" in message
    assert "custom_st.Transformer, custom_st.py in the folder" in message
    with pytest.raises(UntrustedCodeError):
        resolve(folder)
    assert not sentinel.exists()
