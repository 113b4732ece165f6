"""What opening a user's file may do, decided before anything opens it.

Every file modelpress is given is DATA, which it parses (safetensors, ONNX, GGUF, JSON/YAML, `.npy`
without pickle, `torch.load(weights_only=True)`), or CODE, which runs its author's code when loaded:

- an arbitrary pickle (`.pt`, `.pth`, `.bin`, `.ckpt`, `.pkl` that needs `weights_only=False`);
- a `torch.export` program (`.pt2` with `models/model.json`: parts of it are unpickled);
- an AOTInductor package (`.pt2` with `data/aotinductor/`: its shared library is loaded);
- a TorchScript archive (its code is compiled and run, its objects unpickled);
- a Hugging Face folder with custom code (`auto_map` in `config.json` or `tokenizer_config.json`);
- a sentence-transformers folder whose `modules.json` names module classes outside
  `sentence_transformers.models`.

CODE is refused, before any loader sees the file, unless the caller passes `trust_code=True` (CLI:
`--trust-code`), with one message naming the file, the kind of code and why loading runs it:

    >>> require_trust(Path("model.pt2"), AOTI, trust_code=False)
    Traceback (most recent call last):
    UntrustedCodeError: model.pt2 is an AOTInductor package: loading it runs the compiled library inside it;
    refused. Re-run with --trust-code (trust_code=True) only if you trust its source

Files that are not regular files (FIFOs, sockets, devices) are refused before they are opened:
reading one blocks or never ends.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal, NamedTuple

from modelpress.core.errors import ModelLoadError, UnsafePickleError, UntrustedCodeError
from modelpress.core.files import check_not_special as check_not_special


class CodeKind(NamedTuple):
    """A kind of file that runs code when loaded: what it is and why loading it runs code."""

    what: str
    why: str


PICKLE = CodeKind("a pickle of arbitrary Python objects", "unpickles them, which can call any Python function")
TORCH_EXPORT = CodeKind("a torch.export program", "unpickles parts of the archive, which can call any Python function")
AOTI = CodeKind("an AOTInductor package", "runs the compiled library inside it")
TORCHSCRIPT = CodeKind("a TorchScript archive", "runs the TorchScript code and unpickles the objects inside it")
HF_CUSTOM_CODE = CodeKind("a Hugging Face model with custom code", "imports that Python code")
ST_CUSTOM_MODULES = CodeKind("a sentence-transformers model with custom modules", "imports that Python code")

TRUST_HINT = "Re-run with --trust-code (trust_code=True) only if you trust its source"
ArchiveKind = Literal["aoti", "torch-export", "torchscript", "zip"]


def require_trust(path: str | Path, kind: CodeKind, trust_code: bool, detail: str = "") -> None:
    """Raise `UntrustedCodeError` for `path` of `kind` unless `trust_code`; `detail` follows the kind."""
    if trust_code:
        return
    error = UnsafePickleError if kind is PICKLE else UntrustedCodeError
    what = f"{kind.what} ({detail})" if detail else kind.what
    raise error(f"{path} is {what}: loading it {kind.why}; refused. {TRUST_HINT}")


def trust_flag(trust_code: bool, trust_pickle: bool) -> bool:
    """`trust_code`, with the deprecated `trust_pickle` meaning the same."""
    if trust_pickle:
        warnings.warn("trust_pickle is deprecated; use trust_code", DeprecationWarning, stacklevel=3)
    return trust_code or trust_pickle


# ---------------------------------------------------------------- files that block


def check_folder_files(folder: Path, what: str) -> None:
    """`check_not_special` for every entry of `folder` (not recursive): loaders read them by name."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise ModelLoadError(f"cannot list {what} {folder}: {e}") from None
    for entry in entries:
        check_not_special(entry, f"{what} file")


# ---------------------------------------------------------------- archives


def archive_kind(path: Path) -> ArchiveKind | None:
    """What a zip archive holds, from its member names alone (nothing in it is read); None if not a zip."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise ModelLoadError(f"{path} is a damaged zip archive: {e}") from None
    if any(n.startswith("data/aotinductor/") or "/data/aotinductor/" in n for n in names):
        return "aoti"
    if any(n == "models/model.json" or n.endswith("/models/model.json") for n in names):
        return "torch-export"
    # torch.load dispatches an archive with constants.pkl to torch.jit.load: the same test here.
    if any(n == "constants.pkl" or n.endswith("/constants.pkl") or "/code/__torch__/" in n for n in names):
        return "torchscript"
    return "zip"


# ---------------------------------------------------------------- Hugging Face folders


def hf_custom_code(folder: Path) -> list[tuple[Path, list[str]]]:
    """The code each `auto_map` of a Hugging Face folder names (config.json, tokenizer_config.json).

    Each entry is reported as the Python file it lives in (`modeling_x.py`) or, for code in another
    repository, as written (`org/repo--modeling_x.Model`). Empty when the folder needs no custom code.
    """
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{file} is not valid JSON: {e}") from None
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            found.append((file, auto_map_code(auto_map)))
    return found


def auto_map_code(auto_map: Any) -> list[str]:
    """The code files (or references) a Hugging Face `auto_map` names, in order, each once."""
    named: dict[str, None] = {}  # ordered set
    for ref in auto_map.values() if isinstance(auto_map, dict) else [auto_map]:
        for item in ref if isinstance(ref, list) else [ref]:
            if isinstance(item, str) and "--" not in item and "." in item:
                named.setdefault(f"{item.rsplit('.', 1)[0].replace('.', '/')}.py")
            elif item is not None:
                named.setdefault(str(item))
    return list(named) or [json.dumps(auto_map)[:80]]


ST_MODULES = ("Transformer", "Pooling", "Normalize")  # the sentence_transformers.models classes modelpress reads
ST_PACKAGE = "sentence_transformers.models."


def st_module_kind(type_name: str, folder: Path, trust_code: bool) -> str | None:
    """The supported module (`Transformer`, `Pooling`, `Normalize`) a modules.json `type` names, else None.

    A class outside the sentence_transformers package is custom code, refused unless `trust_code`.
    modelpress never imports it: trusted, a custom class named like a supported one is read as that one.
    """
    name = type_name.rsplit(".", 1)[-1]
    if type_name.startswith("sentence_transformers."):
        return name if type_name.startswith(ST_PACKAGE) and name in ST_MODULES else None
    module = type_name.rsplit(".", 1)[0].replace(".", "/") + ".py"
    beside = f"{module} in the folder" if (folder / module).is_file() else "not part of sentence_transformers"
    require_trust(folder / "modules.json", ST_CUSTOM_MODULES, trust_code, f"{type_name}, {beside}")
    return name if name in ST_MODULES else None
