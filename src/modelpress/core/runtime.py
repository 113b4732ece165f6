"""Runtimes that execute an artifact: ONNX Runtime sessions and AOTInductor packages.

Loading a model, measuring it, gating an export and quantizing an ONNX graph all run artifacts, so the
runtimes sit at the bottom with the other shared pieces (`modelpress.export.runtime` re-exports them).
Both wrappers are callables with the model's forward signature (torch tensors in, torch tensors
out), so benchmarks and evaluations treat them like the eager model. An ONNX file is data; an
AOTInductor package runs the library inside it, so `AotiModel` is for packages modelpress has just
written or the user trusts (`modelpress.loading.resolve` asks for `trust_code=True` first).

    >>> onnx_model = OnnxModel("out/model.onnx", threads=2)
    >>> token_states = onnx_model(input_ids, attention_mask)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.core.errors import BadInputError, ModelLoadError

SESSION_CONFIG_KEY = "modelpress.ort_session_config"  # written by export.onnx_graph.add_session_hints


def _session_config(path: Path, text: str) -> dict[str, str]:
    """The ORT session settings a model's metadata names: a JSON object of string or number values."""
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path}: metadata {SESSION_CONFIG_KEY} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not all(isinstance(v, (str, int, float)) for v in config.values()):
        raise ModelLoadError(
            f"{path}: metadata {SESSION_CONFIG_KEY} must be a JSON object of ONNX Runtime session settings "
            f'(e.g. {{"session.set_denormal_as_zero": "1"}}), got {text[:80]!r}'
        )
    return {str(k): str(v) for k, v in config.items()}


class OnnxModel:
    """An ONNX model run by ONNX Runtime on the CPU; inputs are bound positionally to graph inputs."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
            onnx.checker.check_model(proto)
        except Exception as e:  # onnx raises DecodeError, ValidationError, OSError...
            raise ModelLoadError(f"{self.path} is not a valid ONNX model: {e}") from None
        opts = ort.SessionOptions()
        # Session settings the exporter measured the graph with (e.g. denormals as zero), from its metadata.
        for prop in proto.metadata_props:
            if prop.key == SESSION_CONFIG_KEY:
                for key, value in _session_config(self.path, prop.value).items():
                    try:
                        opts.add_session_config_entry(key, value)
                    except Exception as e:
                        raise ModelLoadError(
                            f"{self.path}: metadata {SESSION_CONFIG_KEY} sets {key}={value!r}, "
                            f"which ONNX Runtime refuses: {e}"
                        ) from None
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelLoadError(f"ONNX Runtime cannot load {self.path}: {e}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.threads = threads

    def __call__(self, *inputs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"{self.path.name} takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        feed = {n: _to_numpy(x) for n, x in zip(self.input_names, inputs, strict=True)}
        try:
            outs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        except Exception as e:  # ORT's InvalidArgument / Fail for wrong shapes or element types
            expected = ", ".join(f"{n} {shape} {t}" for n, shape, t in self.input_specs())
            given = ", ".join(f"{n} {list(v.shape)} {v.dtype}" for n, v in feed.items())
            raise BadInputError(
                f"{self.path.name} expects {expected}; got {given} ({str(e).splitlines()[0]})"
            ) from None
        return outs[0] if len(outs) == 1 else tuple(outs)

    def input_specs(self) -> list[tuple[str, list[int | str | None], str]]:
        """(name, shape with symbolic dims as strings, element type) of each graph input."""
        return [(i.name, list(i.shape), i.type) for i in self.session.get_inputs()]

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, inputs={self.input_names})"


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# The process environment is shared: one package load at a time points TMPDIR at its own folder.
_TMPDIR_LOCK = threading.Lock()


def _load_package(path: Path) -> tuple[Any, str]:
    """`aoti_load_package(path)` with the package unpacked into a fresh folder of ours: (runner, folder).

    torch's C++ loader unpacks the package into a randomly named `aotinductor_*` folder under the C++ temporary
    directory (TMPDIR) and removes it only when the loader is destroyed, so a process that is killed
    (the speed gate's child past its limit) leaves the library and sources behind. The folder is
    chosen through TMPDIR, set for the load only.
    """
    from torch._inductor import aoti_load_package

    folder = tempfile.mkdtemp(prefix="modelpress-aoti.")  # also fixes tempfile's own choice before TMPDIR moves
    try:
        with _TMPDIR_LOCK:
            before = os.environ.get("TMPDIR")
            os.environ["TMPDIR"] = folder
            try:
                return aoti_load_package(str(path)), folder
            finally:
                if before is None:
                    del os.environ["TMPDIR"]
                else:
                    os.environ["TMPDIR"] = before
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


class AotiModel(nn.Module):
    """An AOTInductor package (`.pt2` from `aoti_compile_and_package`) as a callable module.

    The unpacked package is deleted as soon as it is loaded (the library stays mapped; POSIX lets a
    loaded file be unlinked), so nothing is left in the temporary directory even when the process
    is killed later. Where the files cannot be removed while loaded, they go when the model does.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            self.runner, folder = _load_package(self.path)
        except Exception as e:
            raise ModelLoadError(f"cannot load AOTInductor package {self.path}: {e}") from None
        shutil.rmtree(folder, ignore_errors=True)
        if os.path.exists(folder):  # e.g. Windows, which keeps a loaded library's file
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)

    def forward(self, *inputs: torch.Tensor) -> Any:
        out = self.runner(*inputs)
        return out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out
