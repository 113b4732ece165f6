"""One entry point for deployable artifacts: `.onnx` for ONNX Runtime, `.pt2` for AOTInductor, with a parity gate.

    >>> parity = export_artifact("minilm", "out/minilm.onnx")          # fp32 graph, checked against torch
    >>> parity = export_artifact(qmodel, "out/model.pt2", example_inputs=entry.example_inputs(2))

The artifact kind follows the file suffix. Both are written atomically and checked against the model
they came from on its example inputs; a graph that does not compute what the model computes is
refused with the measured difference and nothing is left at `out_path`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.errors import BadInputError
from modelpress.core.numerics import exactly
from modelpress.core.outputs import check_output, claim_output, estimate_bytes
from modelpress.export.onnx_graph import ExportError, ExportWarning, compare_outputs, real_positions

SUFFIXES = (".onnx", ".pt2")
# The .pt2 runs float ops in bf16 (8-bit mantissa): outputs agree with fp32 to ~1e-2, cosine > 0.999.
PT2_MIN_COSINE = 0.995


@exactly
def export_artifact(
    model: str | Path | nn.Module,
    out_path: str | Path,
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    batch_axes: tuple[int, ...] | None = None,
    weights: str | Path | None = None,
    trust_code: bool = False,
    trust_pickle: bool = False,
    opset: int = 17,
    optimize: bool = True,
    bf16: bool | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export `model` (a spec as for `load_model`, or a module) to `out_path`; returns the parity figures.

    `example_inputs` defaults to the zoo entry's (or the model folder's) example inputs; a model
    whose inputs are unknown needs them; `batch_axes` (default: the entry's, else 0) is each input's
    batch axis in the `.pt2`. An existing `out_path` is replaced only with `overwrite`, and never when it
    is the model's own file (see `core.outputs`). `weights` and `trust_code` (`trust_pickle`: its deprecated
    name) load the model as in `load_model`.
    """
    spec = model if isinstance(model, (str, Path)) else None
    check_output(out_path, kind="file", overwrite=overwrite, inputs=[spec, weights], suffixes=SUFFIXES)
    module, inputs, entry_axes = _module_and_inputs(model, example_inputs, weights, trust_code, trust_pickle)
    batch_axes = batch_axes or entry_axes
    need = estimate_bytes(module)
    with claim_output(
        out_path, kind="file", overwrite=overwrite, inputs=[spec, weights], need_bytes=need, suffixes=SUFFIXES
    ):
        return _export_to(module, inputs, Path(out_path), batch_axes, opset, optimize, bf16)


def _export_to(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out: Path,
    batch_axes: tuple[int, ...] | None,
    opset: int,
    optimize: bool,
    bf16: bool | None,
) -> dict[str, Any]:
    if out.suffix == ".onnx":
        from modelpress.export.onnx import check_parity, export_onnx

        export_onnx(module, inputs, out, opset=opset, optimize=optimize, batch_axes=batch_axes)  # gated inside
        return {"artifact": str(out), **check_parity(module, out, inputs)}
    if bf16 is None:  # bf16 float ops where the CPU has bf16 dot products
        from modelpress.export.inductor import choose_lowering

        bf16 = choose_lowering()["bf16"]
    return {"artifact": str(out), **_export_pt2(module, inputs, out, bf16, batch_axes)}


def _module_and_inputs(
    model: str | Path | nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | None,
    weights: str | Path | None,
    trust_code: bool,
    trust_pickle: bool,
) -> tuple[nn.Module, tuple[torch.Tensor, ...], tuple[int, ...] | None]:
    if isinstance(model, nn.Module) and weights is None:
        module, entry = model, None
    else:
        from modelpress.loading import resolve

        loaded = resolve(model, weights=weights, trust_code=trust_code, trust_pickle=trust_pickle)
        if not isinstance(loaded.model, nn.Module):
            raise BadInputError(f"{loaded.spec} is already a {loaded.kind} artifact; export takes a PyTorch model")
        module, entry = loaded.model, loaded.entry
    if example_inputs is None:
        if entry is None:
            raise BadInputError(
                "the model's inputs are unknown: pass example inputs (CLI: --input-shape 1,3,32,32, repeat per input)"
            )
        example_inputs = tuple(entry.example_inputs(2))
    return module.eval(), tuple(example_inputs), entry.batch_axes if entry is not None else None


def _export_pt2(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], out: Path, bf16: bool, batch_axes: tuple[int, ...] | None
) -> dict[str, float]:
    with atomic_path(out) as tmp:
        return package_checked(module, inputs, tmp, bf16=bf16, batch_axes=batch_axes)


def package_checked(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    bf16: bool = True,
    batch_axes: tuple[int, ...] | None = None,
    signed_int8: bool | None = None,
) -> dict[str, float]:
    """Compile `module` into an AOTInductor package at `path` and check it against the module.

    A bf16 package whose outputs drift below `PT2_MIN_COSINE` (bf16 float ops around sensitive int8
    layers) is rebuilt with fp32 float ops (an `ExportWarning` says so). One that still fails is refused,
    unless the module has quantized layers and is as far from the package as float rounding alone moves it:
    the ONNX gate's rule (`onnx_quant.noise_floor`, at most `NOISE_FACTOR` times that spread), with a warning.
    """
    import warnings

    from modelpress.core.runtime import AotiModel
    from modelpress.export.inductor import compile_package

    with torch.inference_mode():
        expected = _first(module(*inputs)).float()
    positions = real_positions(inputs, expected)
    for attempt_bf16 in (True, False) if bf16 else (False,):
        compile_package(module, inputs, path, bf16=attempt_bf16, batch_axes=batch_axes, signed_int8=signed_int8)
        with torch.inference_mode():
            actual = _first(AotiModel(path)(*inputs)).float()
        parity = compare_outputs(expected, actual, positions)
        if parity["mean_cosine"] >= PT2_MIN_COSINE:
            return {**parity, "bf16": attempt_bf16}
        if attempt_bf16:
            warnings.warn(
                f"the bf16 package drifts from the model (mean cosine {parity['mean_cosine']:.4f}); "
                "rebuilt with fp32 float ops",
                ExportWarning,
                stacklevel=2,
            )
    from modelpress.export.onnx_quant import has_quantized_layers, within_noise_floor

    if has_quantized_layers(module):  # a deep int8 model can move that far under float rounding alone
        floor = within_noise_floor(module, inputs, parity, "model.pt2", "the compiled package", PT2_MIN_COSINE, 4)
        return {**parity, "bf16": False, "noise_floor": floor}
    raise ExportError(f"the compiled package does not compute what the model computes: {parity}")


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
