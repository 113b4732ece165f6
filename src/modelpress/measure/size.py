"""Parameter counts and size on disk of a model's saved artifact (an eager model's counts: `core.modules`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import save_model
from torch import nn

from modelpress.core.errors import BadInputError
from modelpress.core.modules import count_params

__all__ = ["count_params", "artifact_size_bytes", "count_onnx_params"]  # count_params: core.modules


def artifact_size_bytes(model_or_path: nn.Module | str | os.PathLike[str]) -> int:
    """Size on disk in bytes of a saved artifact.

    A path is measured as it is (a folder: the sum of its files). An `nn.Module` is saved as
    safetensors (shared tensors once, contiguous) to a temporary folder and that file is measured:
    the size of the saved artifact of an eager model. For compressed forms, pass the artifact's path.

        >>> artifact_size_bytes(model)            # eager fp32: about 4 bytes per parameter
        >>> artifact_size_bytes("out/model.onnx")
    """
    if isinstance(model_or_path, nn.Module):
        with tempfile.TemporaryDirectory(prefix="modelpress-size-") as tmp:
            file = Path(tmp) / "model.safetensors"
            try:
                if any(getattr(getattr(m, "weight_scheme", None), "bits", 8) < 8 for m in model_or_path.modules()):
                    from modelpress.quant.packed import save_packed

                    save_packed(model_or_path, file)
                else:
                    save_model(model_or_path, str(file), force_contiguous=True)
            except (TypeError, ValueError, RuntimeError) as e:
                raise BadInputError(
                    f"cannot save {type(model_or_path).__name__} as safetensors to measure its size ({e}); "
                    "pass the path of its exported artifact instead"
                ) from e
            return file.stat().st_size
    path = Path(model_or_path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        # stat() follows links: a Hugging Face snapshot folder links its files to blobs
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    raise BadInputError(f"artifact path does not exist: {path}")


def count_onnx_params(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(parameters, non-zero parameters) of an ONNX graph: its float initializers and its quantized weights.

    Quantized weights are 8-bit initializers of two or more dimensions (a MatMulNBits weight counts its
    K x N values, not its packed bytes); other integer initializers (shapes, indices, zero points) and
    scalars are not parameters.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    packed = {n.input[1]: n for n in graph.node if n.op_type == "MatMulNBits"}
    qparams = {i for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    params = nonzero = 0
    for init in graph.initializer:
        if init.name in qparams:  # scales and zero points of quantized tensors
            continue
        arr = numpy_helper.to_array(init)
        if init.name in packed:
            attrs = {a.name: a.i for a in packed[init.name].attribute}
            params += attrs["K"] * attrs["N"]
            nonzero += attrs["K"] * attrs["N"]  # packed codes: zeros are not distinguishable from values
            continue
        weight = np.issubdtype(arr.dtype, np.floating) or (arr.dtype in (np.int8, np.uint8) and arr.ndim >= 2)
        if not weight or arr.size <= 1:
            continue
        params += int(arr.size)
        nonzero += int(np.count_nonzero(arr))
    return params, nonzero
