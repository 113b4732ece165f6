"""Model specs -> models. One function resolves every spec the CLI and the API accept.

A spec is a zoo name (`minilm`, `digits-cnn`, `silero-vad`), a Hugging Face model folder (a text
encoder, a causal LM or an image model: ViT, Swin, ConvNeXt, ResNet, ...), a sentence-transformers
folder, an `.onnx` file, a `.pt2` file (a `torch.export` program or an AOTInductor package), a
TorchScript archive, or `package.module:factory`. Weights load only
through safetensors or `torch.load(weights_only=True)`. A file that runs code when loaded (an
arbitrary pickle, a `.pt2`, TorchScript, a folder with custom code; see `modelpress.trust`) is
refused before it is opened unless `trust_code=True`.

    >>> model = load_model("digits-cnn")
    >>> model = load_model("mypkg.models:build", weights="ckpt.safetensors")
    >>> model = load_model("out/model.pt2", trust_code=True)   # a .pt2 runs code: only from a trusted source
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modelpress import trust
from modelpress.core.errors import BadInputError, ModelLoadError
from modelpress.core.runtime import AotiModel, OnnxModel
from modelpress.zoo.base import ZooEntry, get_entry, zoo_names
from modelpress.zoo.generic import ShapeEntry

SpecKind = Literal[
    "module",
    "zoo",
    "hf-folder",
    "sentence-transformers",
    "onnx",
    "torch-export",
    "aoti",
    "torchscript",
    "factory",
    "pickle",
    "causal-lm",
    "gguf",
    "hf-vision",
]
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}
# What torch's weights-only unpickler says of a pickle that names a class or function it does not allow
# (rather than of bytes that are no pickle at all).
_NEEDS_CODE = re.compile(r"global|reduce|unsupported class", re.IGNORECASE)


@dataclass
class LoadedModel:
    """A resolved spec: the runnable model plus what is known about how to feed and evaluate it."""

    spec: str
    name: str
    kind: SpecKind
    model: nn.Module | OnnxModel
    entry: ZooEntry | None = None  # example inputs and task metric, when known
    path: Path | None = None  # the file or folder the model came from


def spec_help() -> str:
    return (
        f"a zoo name ({', '.join(zoo_names())}), a Hugging Face folder (text encoder, causal LM or image model) "
        "or sentence-transformers folder, a .gguf file, an .onnx file, a .pt2 file (torch.export or AOTInductor), "
        "a TorchScript archive, or package.module:factory"
    )


def is_factory_spec(spec: str | Path | nn.Module) -> bool:
    """Whether `spec` reads as `package.module:factory` (and names no existing file)."""
    return isinstance(spec, str) and bool(_FACTORY.match(spec.strip())) and not Path(spec.strip()).exists()


def resolve(
    spec: str | Path | nn.Module,
    *,
    weights: str | Path | None = None,
    trust_code: bool = False,
    trust_pickle: bool = False,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Resolve `spec` to a model; raises `ModelLoadError` (exit code 2 on the CLI) for bad specs.

    `weights` (a `.safetensors` or weights-only `.pt` state dict) goes into a module or a factory's
    model. `trust_code=True` allows files that run code when loaded (`UntrustedCodeError` without it);
    `trust_pickle` is its deprecated name.
    """
    trust_code = trust.trust_flag(trust_code, trust_pickle)
    if isinstance(spec, nn.Module):
        model = spec
        if weights is not None:
            _load_weights_into(model, Path(weights), trust_code)
        return LoadedModel(type(spec).__name__, type(spec).__name__, "module", model)
    text = str(spec).strip()
    if not text:
        raise ModelLoadError(f"empty model spec; expected {spec_help()}")
    path = Path(text).expanduser()

    if text in zoo_names() and not path.exists():
        if weights is not None:
            raise ModelLoadError(f"--weights cannot be combined with the zoo model {text!r}")
        entry = get_entry(text)
        return LoadedModel(text, text, "zoo", entry.load(cache_dir=cache_dir), entry)

    if _FACTORY.match(text) and not path.exists():
        model = _from_factory(text)
        if weights is not None:
            _load_weights_into(model, Path(weights), trust_code)
        return LoadedModel(text, text.rsplit(":", 1)[1], "factory", model.eval())

    if not path.exists():
        hint = ""
        if "/" not in text and "." not in text:
            hint = f" (not a zoo name either; zoo: {', '.join(zoo_names())})"
        raise ModelLoadError(f"model spec {text!r}: no such file or folder{hint}; expected {spec_help()}")
    if weights is not None:
        raise ModelLoadError(f"--weights applies to package.module:factory specs, not to {text!r}")
    trust.check_not_special(path, "model")
    return _from_path(path, trust_code)


def with_input_shape(loaded: LoadedModel, shapes: str | list[str]) -> LoadedModel:
    """`loaded` with synthetic example inputs of `shapes` (`--input-shape 1,3,224,224`, batch first; one per
    input) for a model whose inputs are unknown (a factory, a module, a pickle). The model runs once on
    them here: a shape it cannot take is refused (`BadInputError`, naming the shape and the model's error).
    A model whose inputs are known already (a zoo entry, a Hugging Face folder) is refused too."""
    entry = ShapeEntry.from_shape_text(shapes)
    shown = " ".join(f"--input-shape {','.join(map(str, s))}" for s in entry.shapes)
    if loaded.entry is not None and not isinstance(loaded.entry, ShapeEntry):
        raise BadInputError(f"{shown}: {loaded.spec} brings its own inputs ({loaded.kind}); drop --input-shape")
    if isinstance(loaded.model, nn.Module):
        try:
            with torch.inference_mode():
                loaded.model(*entry.example_inputs(2))
        except Exception as e:  # noqa: BLE001 - any error of the user's forward: the shape does not fit
            raise BadInputError(f"{shown} does not fit {loaded.spec}: {type(e).__name__}: {e}") from None
    return dataclasses.replace(loaded, entry=entry)


def with_entry_like(loaded: LoadedModel, name: str) -> LoadedModel:
    """`loaded` with the inputs and task metric of the zoo entry `name` (`--like digits-cnn`: an exported or
    converted digits CNN scored on the digits test and validation splits) where it has no metric of its own;
    a model with one keeps it (as `bench --like` does)."""
    entry = get_entry(name)
    if loaded.entry is not None and loaded.entry.has_quality:
        return loaded
    return dataclasses.replace(loaded, entry=entry)


def load_model(
    spec: str | Path | nn.Module,
    *,
    weights: str | Path | None = None,
    trust_code: bool = False,
    trust_pickle: bool = False,
) -> nn.Module | OnnxModel:
    """Load the model named by `spec` (see the module docstring for the accepted forms).

    >>> model = load_model("minilm")            # TextEncoder: (input_ids, attention_mask) -> token states
    >>> onnx_model = load_model("model.onnx")   # ONNX Runtime session with the same call signature
    """
    return resolve(spec, weights=weights, trust_code=trust.trust_flag(trust_code, trust_pickle)).model


def _from_path(path: Path, trust_code: bool) -> LoadedModel:
    spec = str(path)
    if path.is_dir():
        from modelpress.zoo import causal_lm, text, vision

        if (path / "modules.json").is_file():
            model = text.load_sentence_transformers_folder(path, trust_code=trust_code)
            return LoadedModel(spec, path.name, "sentence-transformers", model, text.FolderEntry(model), path)
        if (path / "config.json").is_file() and causal_lm.is_causal_lm_folder(path):
            lm = causal_lm.load_causal_lm_folder(path, trust_code=trust_code)
            return LoadedModel(spec, path.name, "causal-lm", lm, causal_lm.CausalLMEntry(lm, path.name), path)
        if (path / "config.json").is_file() and vision.is_vision_folder(path):
            image_model = vision.load_vision_folder(path, trust_code=trust_code)
            image_entry = vision.VisionFolderEntry(image_model, path.name)
            return LoadedModel(spec, path.name, "hf-vision", image_model, image_entry, path)
        if (path / "config.json").is_file():
            model = text.load_hf_folder(path, trust_code=trust_code)
            return LoadedModel(spec, path.name, "hf-folder", model, text.FolderEntry(model), path)
        raise ModelLoadError(
            f"folder {spec} is neither a Hugging Face model (no config.json) "
            "nor a sentence-transformers model (no modules.json)"
        )
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        onnx_model = OnnxModel(path)
        entry = ShapeEntry.from_onnx(onnx_model.input_specs())
        return LoadedModel(spec, path.name, "onnx", onnx_model, entry, path)
    if suffix == ".gguf":  # data: tensors and key-value metadata, dequantized to float32
        from modelpress.zoo import causal_lm

        lm = causal_lm.load_gguf(path)
        return LoadedModel(spec, path.name, "gguf", lm, causal_lm.CausalLMEntry(lm, path.stem), path)
    if suffix == ".safetensors":
        raise ModelLoadError(
            f"{spec} holds weights only; give the architecture as package.module:factory "
            f"and pass the file as --weights {spec}"
        )
    # Classified by member names before anything in the archive is read: each loader below runs code.
    archive = trust.archive_kind(path)
    if archive == "aoti":
        trust.require_trust(path, trust.AOTI, trust_code)
        return LoadedModel(spec, path.name, "aoti", AotiModel(path), None, path)
    if archive == "torch-export":
        trust.require_trust(path, trust.TORCH_EXPORT, trust_code)
        program_module, shapes = _load_exported(path)
        return LoadedModel(spec, path.name, "torch-export", program_module, shapes, path)
    if archive == "torchscript":
        trust.require_trust(path, trust.TORCHSCRIPT, trust_code)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ModelLoadError(f"cannot load TorchScript archive {spec}: {e}") from None
        return LoadedModel(spec, path.name, "torchscript", module.eval(), None, path)
    if suffix in _PICKLE_SUFFIXES or archive == "zip":
        obj = _torch_load(path, trust_code)
        if isinstance(obj, nn.Module):
            return LoadedModel(spec, path.name, "pickle", obj.eval(), None, path)
        raise ModelLoadError(
            f"{spec} holds {'a state dict' if isinstance(obj, dict) else type(obj).__name__}, not a model; "
            f"give the architecture as package.module:factory and pass the file as --weights {spec}"
        )
    if suffix == ".pt2":
        raise ModelLoadError(f"{spec} is not a valid .pt2 archive (torch.export program or AOTInductor package)")
    raise ModelLoadError(
        f"cannot tell what kind of model {spec} is (suffix {suffix or 'none'!r}); expected {spec_help()}"
    )


def _load_exported(path: Path) -> tuple[nn.Module, ShapeEntry | None]:
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load torch.export program {path}: {e}") from None
    # The program keeps the example inputs it was traced with: time it on inputs of that shape.
    args = (program.example_inputs or ((), {}))[0]
    entry = ShapeEntry.from_tensors(args) if args and all(isinstance(a, torch.Tensor) for a in args) else None
    return program.module(), entry


def _from_factory(text: str) -> nn.Module:
    module_name, attr = text.rsplit(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: a factory module in the working directory is found
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import module {module_name!r} for factory spec {text!r}: {e}") from None
    except Exception as e:  # the module itself fails: a bug in the user's code, not in modelpress
        raise ModelLoadError(
            f"importing module {module_name!r} for factory spec {text!r} raised {type(e).__name__}: {e}"
        ) from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{module_name!r} has no callable {attr!r} (factory spec {text!r})")
    try:
        model = factory()
    except BadInputError:
        raise
    except Exception as e:
        raise ModelLoadError(f"factory {text!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {text!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _torch_load(path: Path, trust_code: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _needs_code(path, e):  # garbage bytes, not a pickle that names classes
            raise ModelLoadError(f"cannot read {path}: not a valid PyTorch checkpoint") from None
        trust.require_trust(path, trust.PICKLE, trust_code)
        unsafe_reason = e
    except Exception as e:
        raise ModelLoadError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"cannot read {path} even as a trusted pickle: {e} ({unsafe_reason})") from None


def _needs_code(path: Path, error: pickle.UnpicklingError) -> bool:
    """Whether a weights-only load failed on a real pickle that names objects, not on garbage bytes."""
    reason = str(error).split("WeightsUnpickler error:", 1)[-1]
    if _NEEDS_CODE.search(reason):
        return True
    with open(path, "rb") as f:  # a plain pickle (protocol 2+) that torch's weights-only reader cannot parse
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _load_weights_into(model: nn.Module, path: Path, trust_code: bool) -> None:
    trust.check_not_special(path, "weights file")
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"cannot read safetensors file {path}: {e}") from None
    else:
        state = _torch_load(path, trust_code)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path} does not hold a state dict (got {type(state).__name__})")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:  # AttributeError/TypeError: values that are no tensors
        raise ModelLoadError(f"weights in {path} do not fit the model: {e}") from None
