"""Integer ONNX from a quantized model: our QLinear parameters mapped onto ONNX Runtime's int8 operators.

The float graph is exported first, with each `QLinear` standing in as `x @ W_hat + b` (`W_hat`: its
dequantized weight). Every MatMul, fused Attention or Conv whose weight initializer holds exactly some
layer's `W_hat` (matched by value, so the mapping survives renaming and packing) is then rewritten
with that layer's own integers and scales; nothing is re-quantized or re-calibrated here:

- weights: the layer's int8 codes (uint8 + zero points for asymmetric ones), per channel or per tensor,
  stored as int8 initializers: the file shrinks to about a quarter;
- activations, per the layer's `ActSpec`: dynamic per tensor -> `DynamicQuantizeMatMul`; static ->
  `QuantizeLinear` + `MatMulIntegerToFloat` with the calibrated scale; dynamic per token -> a per-row
  `QuantizeLinear` + `MatMulInteger`, rescaled per row and column (ORT's fused ops take one scale per
  tensor); none (weight-only, or group-wise weights) -> int8 codes dequantized when the session loads.
  The bias Add after a MatMul goes into the integer op where it takes one;
- convolutions: `conv="float"` (default) stores int8 weights dequantized when the session loads and
  computes in float; `conv="integer"` quantizes activations as the layer does and runs `ConvInteger`
  (exact parity with the eager layer, but ORT's ConvInteger kernel measured 18x slower than its float
  Conv on digits-cnn at batch 32, so it is not the default);
- BERT-like attention is exported as one ORT `Attention` op (`export.onnx_float`), which becomes `QAttention`
  when Q, K and V share one per-tensor input quantization; other projections that read the same input
  with the same spec become one integer MatMul and a Split, so that input is quantized once;
- embeddings: a `QEmbedding`'s Gather takes its integer rows and per-row scales and dequantizes only
  the gathered rows (`embeddings="auto"`, the default). `embeddings="int8"` also stores the model's
  remaining float tables of at least 64K values as int8 (an export-only choice: the ONNX model then
  differs from the eager one); `"float"` keeps every table float.

The rewrite itself is `export.onnx_int8.quantize_graph` (after `export.onnx_nbits.lower_matmul_nbits` has
taken the group-wise weight-only layers); this module exports, rewrites, and gates the result.

    >>> export_quantized_onnx(qmodel, entry.example_inputs(1), "out/model.onnx")
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import onnx
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.numerics import exactly
from modelpress.export.onnx_float import DynamicAxes, export_float
from modelpress.export.onnx_graph import (
    ExportError,
    ExportWarning,
    add_session_hints,
    as_tuple,
    check_parity,
    compare_outputs,
    first_output,
    real_positions,
)
from modelpress.export.onnx_int8 import quantize_graph
from modelpress.export.onnx_nbits import lower_matmul_nbits
from modelpress.export.onnx_standins import as_lowered, swap_in_float
from modelpress.quant.modules import QConv, QEmbedding, QLinear

# Parity gate against the eager quantized model (mean cosine over real token positions). MiniLM int8-smooth:
# 0.9994. Rounding flips cascade through a deep model, so coarse schemes can miss it (MiniLM with dynamic
# per-tensor activations: ~0.997, also between two correct eager paths); such exports are refused.
MIN_COSINE = 0.999
# ...unless the quantized model itself moves that far under float rounding. In a deep model an input a few
# ulps away flips an activation code, which flips more codes downstream until two runs differ by independent
# rounding noise (measured: SmolLM2-135M with int8 activations gives mean cosine 0.9975 against itself when
# its embedding output moves by 1e-7 relative, the fp32 model 1.0000). Such a model is compared with its own
# spread: `noise_floor` perturbs every quantized layer's input by NOISE_EPS (relative, a few fp32 ulps, as two
# runtimes' float kernels differ) and the graph may differ from the model by NOISE_FACTOR times that.
NOISE_EPS = 1e-6
NOISE_SEEDS = 2
NOISE_FACTOR = 2.0


def has_quantized_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (QLinear, QConv, QEmbedding)) for m in model.modules())


def export_quantized_onnx(
    model: nn.Module,
    example_inputs: Any,
    out_path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: bool | DynamicAxes = True,
    opset: int = 17,
    embeddings: Literal["auto", "float", "int8"] = "auto",
    fuse_attention: bool = True,
    conv: Literal["float", "integer"] = "float",
    batch_axes: tuple[int, ...] | None = None,
) -> Path:
    """Export `model` (holding `QLinear` layers) as an integer ONNX model, written atomically.

    `fuse_attention=False` keeps BERT attention as separate ops (Q, K, V then merge into one integer
    MatMul). ORT's transformer optimizer is not applied: measured on MiniLM, its skip-layer-norm and
    embedding fusions make the int8 model slower (`benchmarks/quant_onnx.py`).
    """
    inputs = as_tuple(example_inputs)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QLinear, QConv, QEmbedding))}
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        export_float(
            model,
            inputs,
            tmp,
            input_names,
            output_names,
            dynamic_axes,
            opset,
            swap_in_float,
            fuse_attention,
            batch_axes,
        )
        proto = onnx.load(str(tmp))
        nbits = lower_matmul_nbits(proto, layers)  # group-wise 2/4/8-bit weight-only QLinear -> MatMulNBits
        rest = {n: m for n, m in layers.items() if n not in nbits}
        expected = {n for n, m in rest.items() if embeddings != "float" or not isinstance(m, QEmbedding)}
        missing = sorted(expected - quantize_graph(proto, rest, embeddings=embeddings, conv=conv))
        if missing:
            raise ExportError(f"no ONNX MatMul/Conv carries the weights of {missing[:5]}; cannot export them as int8")
        add_session_hints(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        reference = as_lowered(model, embeddings, conv)
        parity = check_parity(reference, tmp, inputs)
        if parity["mean_cosine"] < MIN_COSINE:
            within_noise_floor(reference, inputs, parity)
    return out_path


@exactly
def noise_floor(model: nn.Module, inputs: Sequence[Any], seeds: int = NOISE_SEEDS, eps: float = NOISE_EPS) -> float:
    """The lowest mean cosine of `model`'s output against itself when the input of every quantized layer is
    multiplied by `1 + eps * N(0, 1)` (one draw per value, `seeds` runs): how far float rounding alone moves it."""
    import torch

    layers = [m for m in model.modules() if isinstance(m, (QLinear, QConv))]
    with torch.inference_mode():
        expected = first_output(model(*inputs)).float()
    positions = real_positions(inputs, expected)
    worst = 1.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)

        def nudge(_m: nn.Module, args: tuple[Any, ...], g: torch.Generator = g) -> tuple[Any, ...]:
            x = args[0]
            return (x * (1 + eps * torch.randn(x.shape, generator=g, dtype=x.dtype)), *args[1:])

        hooks = [m.register_forward_pre_hook(nudge) for m in layers]
        try:
            with torch.inference_mode():
                moved = first_output(model(*inputs)).float()
        finally:
            for h in hooks:
                h.remove()
        worst = min(worst, compare_outputs(expected, moved, positions)["mean_cosine"])
    return worst


def within_noise_floor(
    reference: nn.Module, inputs: Sequence[Any], parity: dict[str, float], artifact: str = "model.onnx",
    what: str = "the int8 graph", bar: float = MIN_COSINE, stacklevel: int = 3,
) -> float:  # fmt: skip
    """Pass `artifact` below its bar (`bar`) where its distance from the model is within NOISE_FACTOR times the
    model's own spread under float rounding (`noise_floor`), with a warning giving both; refuse it otherwise.
    Returns the floor. Shared by the ONNX and the `.pt2` gates."""
    floor = noise_floor(reference, inputs)
    allowed = 1.0 - NOISE_FACTOR * (1.0 - floor)
    got = parity["mean_cosine"]
    if got < allowed:
        raise ExportError(
            f"{what} does not compute what the quantized model computes: mean cosine {got:.5f} < "
            f"{bar} (max abs difference {parity['max_abs']:.3g}); float rounding alone moves the model to "
            f"{floor:.5f} (noise_floor), so at most {NOISE_FACTOR:g}x that spread ({allowed:.5f}) is accepted"
        )
    warnings.warn(
        f"{artifact} differs from the quantized model by mean cosine {got:.5f} (< {bar}), within its own "
        f"spread: float rounding alone (inputs of its quantized layers moved by {NOISE_EPS:g}) moves the model to "
        f"{floor:.5f}; {artifact} is accepted, its quality is measured on its own",
        ExportWarning,
        stacklevel=stacklevel,
    )
    return floor
