"""AOTInductor packages of quantized models: int8 oneDNN GEMMs where layers are quantized, bf16 elsewhere.

`compile_package` exports a model holding `QLinear` layers (and plain float layers) with
`torch.export`, lowers it with Inductor (freezing on, so the int8 patterns of
`quant.kernels.decomposed_linear` become `onednn.qlinear_pointwise` on prepacked weights) and
writes an AOTInductor `model.pt2` that `torch._inductor.aoti_load_package` runs without the Python
model code. `compile_model` is the same lowering in-process (torch.compile).

    >>> path = compile_package(qmodel, entry.example_inputs(2), "out/model.pt2")
    >>> runner = torch._inductor.aoti_load_package(str(path))
    >>> token_states = runner(input_ids, attention_mask)[0]
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.quant import kernels  # noqa: F401  (registers the quantized_decomposed ops)

# Freezing turns parameters into constants: the int8 weight patterns are prepacked at compile time.
INDUCTOR_CONFIGS: dict[str, Any] = {"freezing": True}


def prepare(model: nn.Module, bf16: bool) -> nn.Module:
    """A private inference copy of `model` (the user's model is never touched)."""
    return copy.deepcopy(model).eval()


@contextlib.contextmanager
def lowering_context(bf16: bool) -> Iterator[None]:
    """Inference mode for tracing, with bf16 autocast for the float ops when asked."""
    with torch.no_grad():
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        else:
            yield


def export_program(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    dynamic_batch: bool = True,
    dynamic_seq: bool = True,
    bf16: bool = True,
) -> torch.export.ExportedProgram:
    """`torch.export` program of a private copy of `model`, batch and sequence axes dynamic if asked."""
    inputs = _examples_for_dynamic(example_inputs, dynamic_batch, dynamic_seq)
    shapes = _dynamic_shapes(inputs, dynamic_batch, dynamic_seq)
    module = prepare(model, bf16)
    with lowering_context(bf16):
        program = torch.export.export(module, inputs, dynamic_shapes=shapes)
    _drop_metadata_asserts(program.graph_module)
    return program


def _drop_metadata_asserts(gm: torch.fx.GraphModule) -> None:
    # Export checks each `.to()` with an `_assert_tensor_metadata` node; as a second user of a
    # dequantize node it stops Inductor from fusing the q/dq pattern into an int8 GEMM.
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()


def compile_package(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    out_path: str | Path,
    *,
    dynamic_batch: bool = True,
    dynamic_seq: bool = True,
    bf16: bool = True,
    inductor_configs: dict[str, Any] | None = None,
) -> Path:
    """Export, lower and package `model` into an AOTInductor `.pt2` at `out_path` (written atomically).

    The package takes the example inputs' tensors positionally (e.g. input_ids, attention_mask)
    and returns the model's outputs, token states first. `bf16` runs the float ops under bf16
    autocast; quantized layers run int8 GEMMs with bf16 (or fp32) outputs.
    """
    out = Path(out_path)
    program = export_program(model, example_inputs, dynamic_batch=dynamic_batch, dynamic_seq=dynamic_seq, bf16=bf16)
    configs = {**INDUCTOR_CONFIGS, **(inductor_configs or {})}
    with atomic_path(out) as tmp, open(tmp, "w+b") as f, torch.no_grad():
        torch._inductor.aoti_compile_and_package(program, package_path=f, inductor_configs=configs)
    return out


def compile_model(
    model: nn.Module, *, bf16: bool = True, dynamic: bool = True, inductor_configs: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """The same lowering in-process: a torch.compile'd private copy of `model` (inference only)."""
    module = prepare(model, bf16)
    compiled = torch.compile(module, dynamic=dynamic, options={**INDUCTOR_CONFIGS, **(inductor_configs or {})})

    def run(*inputs: torch.Tensor) -> Any:
        with lowering_context(bf16):
            return compiled(*inputs)

    return run


def _examples_for_dynamic(
    inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, dynamic_seq: bool
) -> tuple[torch.Tensor, ...]:
    # Export specializes axes of size 0 or 1: widen such example axes to 2 so they stay dynamic.
    out = []
    for x in inputs:
        if dynamic_batch and x.dim() >= 1 and x.shape[0] < 2:
            x = x.expand(2, *x.shape[1:]).contiguous()
        if dynamic_seq and x.dim() >= 2 and x.shape[1] < 2:
            x = torch.cat([x, x], dim=1)
        out.append(x)
    return tuple(out)


def _dynamic_shapes(
    inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, dynamic_seq: bool
) -> tuple[dict[int, Any], ...]:
    # AUTO: export infers the range (and each axis' equalities across inputs) from the model.
    batch = seq = torch.export.Dim.AUTO
    shapes = []
    for x in inputs:
        axes: dict[int, Any] = {}
        if dynamic_batch and x.dim() >= 1:
            axes[0] = batch
        if dynamic_seq and x.dim() >= 2:
            axes[1] = seq
        shapes.append(axes)
    return tuple(shapes)
