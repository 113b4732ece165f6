"""Export to ONNX (a copy of the model, named per the contract, dynamic axes) and the parity gate.

Text encoders (`zoo.text.TextEncoder`) take `input_ids` and `attention_mask` (int64, dynamic batch and
sequence axes) and return `token_states`; other models get `input`/`input_0..` and `output`/`output_0..`
with a dynamic batch axis. The user's model is never touched: a deep copy is exported (the
TorchScript exporter leaves a traced transformers model in a broken state).

BERT-like encoders are exported with eager attention, so that ONNX Runtime's transformer optimizer can
fuse attention, the embedding and skip layer norms and bias-GELU (it fuses nothing on the sdpa graph);
other models get ORT's extended graph optimizations, saved offline. An optimized graph is kept only if
it still matches the unoptimized one. Models holding `QLinear` layers are exported as integer ONNX
(`export.onnx_quant`).

    >>> export_onnx(model, entry.example_inputs(1), "out/model.onnx")
    >>> check_parity(model, "out/model.onnx", entry.example_inputs(4))
    {'max_abs': 3.1e-05, 'mean_cosine': 1.0}
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.errors import ModelpressError

log = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUT = "token_states"
# Families whose graph ORT's transformer optimizer fuses with model_type="bert" (same encoder layout).
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet"}
PARITY_ATOL = 1e-3  # an optimized graph whose output drifts more than this from the plain one is dropped

DynamicAxes = dict[str, dict[int, str]]


class ExportError(ModelpressError):
    """The model cannot be exported, or the exported graph does not compute what the model computes."""


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
) -> Path:
    """Export a copy of `model` to `out_path` (written atomically) and return the path.

    `dynamic_axes=True` makes the batch axis (and a text encoder's sequence axis) dynamic; a dict
    is passed to the exporter as is. `optimize` applies ORT's graph optimizations offline where
    they keep the output unchanged (see the module docstring).
    """
    inputs = _as_tuple(example_inputs)
    from modelpress.export import onnx_quant

    if onnx_quant.has_quantized_layers(model):
        return onnx_quant.export_quantized_onnx(
            model,
            inputs,
            out_path,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset=opset,
            optimize=optimize,
        )
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        export_float(model, inputs, tmp, input_names, output_names, dynamic_axes, opset)
        if optimize:
            optimize_graph(tmp, model, inputs)
    return out_path


def export_float(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: bool | DynamicAxes = True,
    opset: int = 17,
    prepare: Callable[[nn.Module], None] | None = None,
) -> None:
    """Export a deep copy of `model` with the TorchScript exporter; `prepare` may edit the copy first."""
    export_model = exportable_copy(model, inputs)
    if prepare is not None:
        prepare(export_model)
    with torch.inference_mode():
        n_out = len(_as_tuple(export_model(*inputs)))
    in_names, out_names = contract_names(model, len(inputs), n_out, input_names, output_names)
    axes = _dynamic_axes(model, inputs, in_names, out_names) if dynamic_axes is True else dynamic_axes or None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and legacy-exporter warnings, expected here
            torch.onnx.export(
                export_model,
                inputs,
                str(path),
                input_names=list(in_names),
                output_names=list(out_names),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: {e}") from e


def exportable_copy(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """A deep copy in eval mode; a BERT-like text encoder switches to eager attention if that keeps its output."""
    export_model = copy.deepcopy(model).eval()
    backbone = _bert_backbone(export_model)
    if backbone is None or getattr(backbone.config, "_attn_implementation", "eager") == "eager":
        return export_model
    with torch.inference_mode():
        before = export_model(*inputs)
        _set_attention(backbone, "eager")
        after = export_model(*inputs)
    if not torch.allclose(_first(before), _first(after), atol=PARITY_ATOL, rtol=0):
        log.warning("eager attention changes the output of %s; exporting its default attention", type(model).__name__)
        return copy.deepcopy(model).eval()
    return export_model


def _set_attention(backbone: nn.Module, impl: str) -> None:
    if hasattr(backbone, "set_attn_implementation"):
        backbone.set_attn_implementation(impl)
    else:
        backbone.config._attn_implementation = impl


def is_text_encoder(model: nn.Module) -> bool:
    from modelpress.zoo.text import TextEncoder

    return isinstance(model, TextEncoder)


def _bert_backbone(model: nn.Module) -> Any | None:
    backbone = getattr(model, "backbone", None) if is_text_encoder(model) else None
    config = getattr(backbone, "config", None)
    return backbone if getattr(config, "model_type", None) in _BERT_LIKE else None


def contract_names(
    model: nn.Module,
    n_in: int,
    n_out: int,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Graph input and output names: given ones, else the text-encoder contract, else `input`/`output_i`."""
    text = is_text_encoder(model) and n_in == len(TEXT_INPUTS)
    default_in = list(TEXT_INPUTS) if text else _numbered("input", n_in)
    default_out = [TEXT_OUTPUT, *_numbered("output", n_out)[1:]] if text else _numbered("output", n_out)
    in_names = list(input_names) if input_names is not None else default_in
    out_names = list(output_names) if output_names is not None else default_out
    if len(in_names) != n_in:
        raise ExportError(f"{n_in} inputs need {n_in} input_names, got {in_names}")
    if len(out_names) != n_out:
        raise ExportError(f"the model returns {n_out} outputs; got output_names {out_names}")
    return in_names, out_names


def _numbered(stem: str, n: int) -> list[str]:
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]


def _dynamic_axes(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], in_names: list[str], out_names: list[str]
) -> DynamicAxes:
    if is_text_encoder(model):
        axes = {0: "batch", 1: "sequence"}
        return {name: dict(axes) for name in (*in_names, out_names[0])} | {n: {0: "batch"} for n in out_names[1:]}
    return {name: {0: "batch"} for name in (*in_names, *out_names)}


# ---------------------------------------------------------------- graph optimization


def optimize_graph(path: Path, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    """Optimize the ONNX file at `path` in place if the result still matches; returns what was applied."""
    import onnx

    backbone = _bert_backbone(model)
    candidate = path.with_name(path.name + ".opt")
    try:
        if backbone is not None:
            applied = _bert_optimize(path, candidate, backbone.config)
        else:
            applied = _ort_optimize(path, candidate)
        reference = _run_onnx(path, inputs)
        parity = _compare(reference, _run_onnx(candidate, inputs))
        if parity["max_abs"] > PARITY_ATOL * max(1.0, float(reference.abs().max())):
            log.warning("ORT %s changed the output (max_abs %.2e); keeping the plain graph", applied, parity["max_abs"])
            return "none"
        onnx.save(onnx.load(str(candidate)), str(path))  # rewrite in place: path is the caller's temporary file
        return applied
    finally:
        candidate.unlink(missing_ok=True)


def _bert_optimize(src: Path, dst: Path, config: Any) -> str:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(
        str(src), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
    )
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(dst))
    return "bert optimizer (" + ", ".join(f"{k} x{v}" for k, v in fused.items()) + ")"


def _ort_optimize(src: Path, dst: Path) -> str:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # EXTENDED, not ALL: level-ALL layout transforms are specific to this machine's EP and must not be saved.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return "ORT extended graph optimizations"


# ---------------------------------------------------------------- parity


def check_parity(
    torch_fn: Callable[..., Any],
    onnx_path: str | Path,
    inputs: Sequence[torch.Tensor] | torch.Tensor,
    threads: int | None = None,
) -> dict[str, float]:
    """How closely the ONNX model's first output matches `torch_fn`'s on `inputs`.

    `max_abs`: largest absolute difference; `mean_cosine`: mean cosine similarity of the rows along
    the last axis (per token for token states).
    """
    inputs = _as_tuple(inputs)
    with torch.inference_mode():
        expected = _first(torch_fn(*inputs)).float()
    return _compare(expected, _run_onnx(Path(onnx_path), inputs, threads))


def _run_onnx(path: Path, inputs: tuple[torch.Tensor, ...], threads: int | None = None) -> torch.Tensor:
    from modelpress.export.runtime import OnnxModel

    return _first(OnnxModel(path, threads=threads)(*inputs)).float()


def _compare(expected: torch.Tensor, actual: torch.Tensor) -> dict[str, float]:
    if expected.shape != actual.shape:
        raise ExportError(f"ONNX output shape {tuple(actual.shape)} differs from torch's {tuple(expected.shape)}")
    rows = (-1, expected.shape[-1]) if expected.dim() else (1, 1)
    cos = F.cosine_similarity(expected.reshape(rows).double(), actual.reshape(rows).double(), dim=-1)
    return {"max_abs": float((expected - actual).abs().max()), "mean_cosine": float(cos.mean())}


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
