"""Export to ONNX (a copy of the model, named per the contract, dynamic axes) and the parity gate.

Text encoders (`zoo.text.TextEncoder`) take `input_ids` and `attention_mask` (int64, dynamic batch and
sequence axes) and return `token_states`; other models get `input`/`input_0..` and `output`/`output_0..`
with a dynamic batch axis. The user's model is never touched: a deep copy is exported (the TorchScript
exporter leaves a traced transformers model in a broken state).

`optimize` (measured in `benchmarks/quant_onnx.py`, MiniLM, 2 threads): a BERT-like encoder's
self-attention is exported as one ONNX Runtime `Attention` op per layer, which beats both the plain
graph and ORT's transformer optimizer (whose skip-layer-norm fusion is slow on this CPU); other models
get ORT's basic graph optimizations saved offline, kept only if the output still matches. Models
holding `QLinear` layers are exported as integer ONNX (`export.onnx_quant`). The files carry
`SESSION_HINTS` in their metadata: ORT settings they were measured with.

This module is the top of the ONNX export: the float export is `export.onnx_float`, the names, errors and
parity check every ONNX module shares are `export.onnx_graph`; their public names are importable from here.

    >>> export_onnx(model, entry.example_inputs(1), "out/model.onnx")
    >>> check_parity(model, "out/model.onnx", entry.example_inputs(4))
    {'max_abs': 3.1e-05, 'mean_cosine': 1.0}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.numerics import exactly
from modelpress.export.onnx_float import (
    LM_OUTPUT,
    TEXT_INPUTS,
    TEXT_OUTPUT,
    DynamicAxes,
    bert_backbone,
    contract_names,
    export_float,
    exportable_copy,
    is_causal_lm,
    is_text_encoder,
    takes_token_ids,
)
from modelpress.export.onnx_graph import (
    MS_DOMAIN,
    PARITY_ATOL,
    SESSION_HINTS,
    SESSION_HINTS_KEY,
    ArtifactsRefused,
    ExportError,
    ExportWarning,
    add_session_hints,
    as_tuple,
    check_parity,
    compare_outputs,
    first_output,
    real_positions,
    replace_nodes,
    run_onnx,
)

log = logging.getLogger(__name__)

__all__ = [
    "export_onnx", "optimize_graph",
    # export.onnx_float
    "export_float", "exportable_copy", "contract_names", "is_text_encoder", "is_causal_lm", "takes_token_ids",
    "TEXT_INPUTS", "TEXT_OUTPUT", "LM_OUTPUT", "DynamicAxes",
    # export.onnx_graph
    "ExportWarning", "ExportError", "ArtifactsRefused", "PARITY_ATOL", "MS_DOMAIN", "SESSION_HINTS",
    "SESSION_HINTS_KEY", "add_session_hints", "check_parity", "compare_outputs", "real_positions", "replace_nodes",
]  # fmt: skip


@exactly
def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    out_path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: bool | DynamicAxes = True,
    opset: int = 17,
    optimize: bool = True,
    batch_axes: tuple[int, ...] | None = None,
) -> Path:
    """Export a copy of `model` to `out_path` (written atomically) and return the path.

    `dynamic_axes=True` makes the batch axis (and a text encoder's sequence axis) dynamic; a dict
    is passed to the exporter as is. `optimize`: see the module docstring. The written graph is
    checked against the model on `example_inputs` (max abs error <= `PARITY_ATOL`, 1e-4, relative to the
    output's largest magnitude where that exceeds 1; for integer models, mean cosine >= `onnx_quant.MIN_COSINE`,
    0.999, or within the model's own float-rounding spread), else `ExportError`.

        >>> export_onnx(encoder, entry.example_inputs(1), "out/model.onnx")  # input_ids, attention_mask
    """
    inputs = as_tuple(example_inputs)
    from modelpress.export import onnx_quant  # loads the onnx library: only when an export runs

    if onnx_quant.has_quantized_layers(model):
        return onnx_quant.export_quantized_onnx(
            model,
            inputs,
            out_path,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset=opset,
            fuse_attention=optimize,
            batch_axes=batch_axes,
        )
    import onnx

    out_path = Path(out_path)
    names = (input_names, output_names, dynamic_axes, opset)
    with atomic_path(out_path) as tmp:
        export_float(model, inputs, tmp, *names, fuse_attention=optimize, batch_axes=batch_axes)
        if optimize and bert_backbone(model) is None:
            optimize_graph(tmp, model, inputs)
        if not _matches(model, tmp, inputs) and optimize:
            log.warning("the optimized export of %s does not match it; exporting plain", type(model).__name__)
            export_float(model, inputs, tmp, *names, fuse_attention=False, batch_axes=batch_axes)
        if not _matches(model, tmp, inputs):
            raise ExportError(f"the ONNX graph of {type(model).__name__} does not compute what the model computes")
        proto = onnx.load(str(tmp))
        add_session_hints(proto)
        onnx.save(proto, str(tmp))
    return out_path


def _matches(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...]) -> bool:
    with torch.inference_mode():
        scale = max(1.0, float(first_output(model(*inputs)).abs().max()))
    return check_parity(model, path, inputs)["max_abs"] <= PARITY_ATOL * scale


# ---------------------------------------------------------------- graph optimization


def optimize_graph(path: Path, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    """Optimize the ONNX file at `path` in place if the result still matches; returns what was applied.

    BERT-like encoders get ORT's transformer optimizer (on a graph exported with `fuse_attention=False`),
    other models ORT's basic optimizations.
    """
    backbone = bert_backbone(model)
    candidate = path.with_name(path.name + ".opt")
    try:
        if backbone is not None:
            applied = _bert_optimize(path, candidate, backbone.config)
        else:
            applied = _ort_optimize(path, candidate)
        reference = run_onnx(path, inputs)
        parity = compare_outputs(reference, run_onnx(candidate, inputs))
        if parity["max_abs"] > PARITY_ATOL * max(1.0, float(reference.abs().max())):
            log.warning("ORT %s changed the output (max_abs %.2e); keeping the plain graph", applied, parity["max_abs"])
            return "none"
        os.replace(candidate, path)  # path is the caller's temporary file
        return applied
    finally:
        candidate.unlink(missing_ok=True)


def _bert_optimize(src: Path, dst: Path, config: Any) -> str:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(src), "bert", config.num_attention_heads, config.hidden_size)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(dst))
    return "bert optimizer (" + ", ".join(f"{k} x{v}" for k, v in fused.items()) + ")"


def _ort_optimize(src: Path, dst: Path) -> str:
    """ORT's basic optimizations (constant folding, Conv-BN and similar fusions), saved offline.

    Basic, not extended: the saved graph keeps standard ONNX ops, portable to any runtime; ORT applies
    its extended fusions again when it loads the model.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return "ORT basic graph optimizations"
