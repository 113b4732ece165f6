"""Integer kernels for quantized layers: oneDNN int8 GEMMs in eager mode, Inductor's int8 patterns when traced.

`linear(module, x)` runs a `QLinear` on a real integer kernel where one fits, else returns None
and the module falls back to its float reference (fake-quant) forward:

- int8 activations (static per tensor, dynamic per tensor or per token) with symmetric int8
  weights (per channel or per tensor): `onednn.qlinear_pointwise` on a weight prepacked once and
  cached beside the module. Per-token scales are applied after the GEMM (oneDNN takes one source
  scale), with the zero-point compensation `zp * sum_k w` for asymmetric tokens.
- weight-only int8 per channel (`act.mode == "none"`): `aten._weight_int8pack_mm` for bf16/fp16
  inputs, and for fp32 inputs of fewer than `BF16_GEMM_MIN_ROWS` rows (decode steps) with the
  activations in bf16 (its fp32 path is scalar, 0.15-0.2x the fp32 GEMM; with bf16 activations it runs
  1.3-2.6x, on AVX2 as well), where K is a multiple of 16 (the half kernel's block). Inside `exact()`
  a single fp32 row keeps the fp32 kernel and wider fp32 inputs the reference path; wider ones outside
  it: the bf16 GEMM below.
- weight-only group-wise codes of at most 4 bits (groups of 32 to 256) on fp32 inputs of fewer than
  `BF16_GEMM_MIN_ROWS` rows (decode steps): `aten._weight_int4pack_mm_for_cpu` on the codes packed
  once (activations, scales and offsets in bf16: the reference within bf16 rounding, about 0.3% of a
  layer's output). It reads a quarter of the fp32 GEMM's weight bytes, which bounds a decode step.
- any weight-only layer on fp32 inputs of `BF16_GEMM_MIN_ROWS` rows or more (a prefill), on a CPU with
  bf16 dot products (AVX512-BF16 or AMX; without them the reference path runs): the weight dequantized
  at each call and rounded to bf16 once, then oneDNN's bf16 GEMM (fp32 accumulation; the same 0.3% as
  the int4 GEMM). A prefill is bound by arithmetic, not by bytes: the bf16 GEMM runs 1.2-2x the fp32
  GEMM where the int4 GEMM runs about 0.8-0.9x (`benchmarks/int4_prefill.py`).
- Within `core.numerics.exact()` (the passes, the exports' parity references) the float reference runs
  instead of either bf16 path.

Under `torch.compile` / `torch.export` tracing, `linear` returns `decomposed_linear`: the same
layer written in `quantized_decomposed` q/dq ops (or `_int_mm` for per-token scales), the patterns
Inductor's x86 freezing passes rewrite into `onednn.qlinear_pointwise` on a prepacked weight.

    >>> y = kernels.linear(qlinear, x)  # None: no kernel fits, use the reference forward
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from modelpress.core import environment, numerics
from modelpress.core.environment import int8_gemm_exact, int8_signed_native
from modelpress.primitives.affine import qparams_from_range, quantize, reduce_range

_qd = torch.ops.quantized_decomposed
_HALF = (torch.bfloat16, torch.float16)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why no integer kernel runs `module` (None: one does)."""
    ws, act = module.weight_scheme, module.act
    if not ws.symmetric or ws.bits > 8 or ws.granularity not in ("tensor", "channel"):
        return f"weights int{ws.bits} {'sym' if ws.symmetric else 'asym'} per-{ws.granularity} (need int8 sym)"
    if ws.granularity == "channel" and ws.axis % 2 != 0:
        return "per-channel weight scales must run along the output axis"
    if module.weight_q.dtype != torch.int8:
        return f"weight storage {module.weight_q.dtype} (need int8)"
    if act.mode != "none" and act.bits > 8:
        return f"int{act.bits} activations (need ≤ 8 bits)"
    return None


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output from a real integer kernel, or None where no kernel fits (reference path)."""
    if _int4_applies(module, x):
        return _int4_linear(module, x)
    if _bf16_gemm_applies(module, x):
        return _bf16_gemm_linear(module, x)
    if unsupported_reason(module) is not None or not x.is_floating_point() or x.device.type != "cpu":
        return None
    if module.act.mode != "none" and not int8_gemm_exact():
        return None
    if torch.compiler.is_compiling():
        return decomposed_linear(module, x)
    if x.requires_grad and torch.is_grad_enabled():
        return None  # the kernels have no autograd; training (QAT) goes through the reference
    if module.act.mode == "none":
        return _weight_only(module, x)
    return _int8_linear(module, x)


# ---------------------------------------------------------------- eager oneDNN kernels


@dataclass
class _Packed:
    key: tuple[int, ...]
    weight: torch.Tensor  # oneDNN-packed int8 weight (opaque)
    scale: torch.Tensor  # (N,) fp32 weight scale per output channel
    zero_point: torch.Tensor  # (N,) zeros (symmetric weights)
    scaled_colsum: torch.Tensor  # (N,) scale * sum_k w: zero-point compensation of asymmetric tokens


# Keyed by module so that deepcopy / state_dict / pickling never see the opaque packed weight.
_PACKED: weakref.WeakKeyDictionary[nn.Module, _Packed] = weakref.WeakKeyDictionary()


def weight_scale_vector(module: nn.Module) -> torch.Tensor:
    """The weight scale as one fp32 value per output channel, shape (N,)."""
    return module.weight_scale.float().reshape(-1).expand(module.out_features).contiguous()


def _packed(module: nn.Module) -> _Packed:
    wq, ws = module.weight_q, module.weight_scale
    key = (wq.data_ptr(), wq._version, ws.data_ptr(), ws._version)
    cached = _PACKED.get(module)
    if cached is None or cached.key != key:
        scale = weight_scale_vector(module)
        colsum = wq.sum(dim=1, dtype=torch.int32).float() * scale
        zeros = torch.zeros(module.out_features, dtype=torch.int64)
        cached = _Packed(key, torch.ops.onednn.qlinear_prepack(wq, None), scale, zeros, colsum)
        _PACKED[module] = cached
    return cached


def _int8_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    act, p = module.act, _packed(module)
    scheme = act.scheme
    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    out_dtype = x.dtype
    bias = module.bias
    if act.mode == "static" or act.granularity == "tensor":
        if act.mode == "static":
            scale, zp = module.act_scale, module.act_zero_point
        else:
            scale, zp = qparams_from_range(*reduce_range(x2d, scheme), scheme)
        q = quantize(x2d.float(), scale, zp, scheme)  # (M, K) uint8 (asym) or int8 (sym)
        q, shift = _source_codes(q)
        y = torch.ops.onednn.qlinear_pointwise(
            q, float(scale), int(zp) + shift, p.weight, p.scale, p.zero_point, bias, 1.0, 0, out_dtype, "none", [], ""
        )
        return y.reshape(*x.shape[:-1], module.out_features)
    # per token: integer GEMM with unit source scale, then each row's scale (and zero point)
    scale, zp = qparams_from_range(*reduce_range(x2d, scheme), scheme)  # (M, 1) each
    q, shift = _source_codes(quantize(x2d.float(), scale, zp, scheme))
    acc = torch.ops.onednn.qlinear_pointwise(
        q, 1.0, shift, p.weight, p.scale, p.zero_point, None, 1.0, 0, torch.float32, "none", [], ""
    )  # (M, N) = (q @ w.T) * w_scale
    if not scheme.symmetric:
        acc = acc - zp.float() * p.scaled_colsum
    y = acc * scale if bias is None else torch.addcmul(bias, acc, scale)
    return y.to(out_dtype).reshape(*x.shape[:-1], module.out_features)


def _source_codes(q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The GEMM's source codes and the zero-point shift they carry: signed int8 codes as they are where
    the CPU multiplies signed sources natively (AMX), else shifted by 128 into uint8 (VNNI and AVX2
    multiply unsigned by signed bytes; for a signed source oneDNN falls back to a reference kernel
    ~100x slower). The shift is exact: the kernel subtracts the zero point before multiplying."""
    if q.dtype != torch.int8 or int8_signed_native():
        return q, 0
    return (q.to(torch.int16) + 128).to(torch.uint8), 128


def _weight_only(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    x2d = x.reshape(-1, x.shape[-1])
    dtype = x.dtype
    # aten's bf16/fp16 kernel reads K in blocks of 16: at other widths it crashes or returns garbage (K = 8: inf)
    half_fits = x2d.shape[1] % 16 == 0
    if dtype in _HALF and not half_fits:
        return None
    if dtype not in _HALF and half_fits and _float_activations_fast(module, x) and x2d.shape[0] < BF16_GEMM_MIN_ROWS:
        dtype = torch.bfloat16  # aten's fp32 path is scalar: 0.15-0.2x the fp32 GEMM, bf16 1.3-2.6x (decode rows)
    elif dtype not in _HALF and x2d.shape[0] > 1:
        return None  # fp32 x wide: the CPU kernel is slower than the fp32 GEMM on the dequantized weight
    scale = weight_scale_vector(module).to(dtype)
    y = torch.ops.aten._weight_int8pack_mm(x2d.to(dtype).contiguous(), module.weight_q, scale).to(x.dtype)
    if module.bias is not None:
        y = y + module.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], module.out_features)


# ---------------------------------------------------------------- group-wise 4-bit weights


INT4_GROUPS = (32, 64, 128, 256)


@dataclass
class _Int4:
    key: tuple[int, ...]
    weight: torch.Tensor  # aten's CPU int4 packing of the unsigned codes (N, K / 2)
    scales_zeros: torch.Tensor  # (K / group, N, 2) bf16: w = (code - 8) * scale + zero
    width: int  # K: in_features padded to whole groups (the storage's padding dequantizes to 0)


_INT4: weakref.WeakKeyDictionary[nn.Module, _Int4] = weakref.WeakKeyDictionary()


def _float_activations_fast(module: nn.Module, x: torch.Tensor) -> bool:
    """A weight-only layer (float activations) on an fp32 CPU input that needs no gradient, run eagerly outside
    `numerics.exact()`: where the kernels below may apply."""
    if getattr(module, "weight_scheme", None) is None or module.act.mode != "none":
        return False
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 2:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return not numerics.is_exact()


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _int4_applies(module: nn.Module, x: torch.Tensor) -> bool:
    """Group-wise weights of at most 4 bits on fewer than `BF16_GEMM_MIN_ROWS` rows: aten's int4 GEMM
    (`_weight_int4pack_mm_for_cpu`, bf16 activations) reads a quarter of the bytes the fp32 GEMM reads,
    which bounds a decode step. It needs no bf16 dot products: capped to AVX-512 without them it runs as fast,
    and capped to AVX2 it is 2-3x the reference path on decode rows (`benchmarks/int4_prefill.py`)."""
    ws = getattr(module, "weight_scheme", None)
    if ws is None or ws.granularity != "group" or ws.bits > 4 or ws.group_size not in INT4_GROUPS:
        return False
    if module.out_features % 16:  # aten's packing takes whole tiles of 16 output channels
        return False
    return _float_activations_fast(module, x) and _rows(x) < BF16_GEMM_MIN_ROWS  # (no shape guards when traced)


def bf16_dot_products() -> bool:
    """Whether the CPU (as capped by `ONEDNN_MAX_CPU_ISA`) has bf16 dot products, AVX512-BF16 or AMX: without
    them oneDNN's bf16 GEMM runs 0.2-0.45x the fp32 GEMM, so prefills keep the reference path."""
    return environment.cpu_info().get("bf16") in ("amx", "avx512_bf16")


def _int4(module: nn.Module) -> _Int4:
    wq, ws, zp = module.weight_q, module.weight_scale, module.weight_zero_point
    key = (wq.data_ptr(), wq._version, ws.data_ptr(), ws._version, zp._version)
    cached = _INT4.get(module)
    if cached is None or cached.key != key:
        rows, groups, group = wq.shape
        offset = 8 if module.weight_scheme.symmetric else 0  # signed codes -8..7 become 0..15
        codes = (wq.to(torch.int32) + offset).reshape(rows, groups * group)
        scale = ws.float().reshape(rows, groups)
        # w = scale * (q - zp) = scale * (q + offset - 8) + scale * (8 - offset - zp)
        zero = scale * (8 - offset - zp.float().reshape(rows, groups))
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        cached = _Int4(key, packed, scales_zeros, groups * group)
        _INT4[module] = cached
    return cached


def _int4_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    p = _int4(module)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[1] < p.width:  # a short last group: its padding holds zero weights
        x2d = F.pad(x2d, (0, p.width - x2d.shape[1]))
    group = module.weight_scheme.group_size
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.to(torch.bfloat16), p.weight, group, p.scales_zeros).float()
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], module.out_features)


# ---------------------------------------------------------------- wide inputs: bf16 GEMM, dequantized weight

# From this many rows on, a weight-only layer dequantizes its weight to bf16 and runs oneDNN's bf16 GEMM: the
# dequantization costs the same at any row count, and the GEMM runs about twice the fp32 GEMM's speed on bf16
# dot products (`benchmarks/int4_prefill.py`); below it a decode step is bound by the weight bytes it reads.
BF16_GEMM_MIN_ROWS = 48


def _bf16_gemm_applies(module: nn.Module, x: torch.Tensor) -> bool:
    return _float_activations_fast(module, x) and _rows(x) >= BF16_GEMM_MIN_ROWS and bf16_dot_products()


def _bf16_gemm_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T with W = (q - zero_point) * scale computed in fp32 (in place, no temporaries), then rounded to
    bf16 once, as are the activations; the GEMM accumulates in fp32."""
    w = module.weight_q.float().sub_(module.weight_zero_point).mul_(module.weight_scale)
    w = w.reshape(module.out_features, -1).to(torch.bfloat16)  # group-wise: in_features padded to whole groups
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[1] < w.shape[1]:  # a short last group: its padding dequantizes to zero weights
        x2d = F.pad(x2d, (0, w.shape[1] - x2d.shape[1]))
    y = F.linear(x2d.to(torch.bfloat16), w).float()
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], module.out_features)


# ---------------------------------------------------------------- traced form (Inductor patterns)


def decomposed_linear_applies(module: nn.Module) -> bool:
    """Whether `decomposed_linear` writes `module` as an int8 pattern (int8 weights and activations)."""
    return unsupported_reason(module) is None and module.act.mode != "none" and int8_gemm_exact()


def decomposed_linear(
    module: nn.Module, x: torch.Tensor, act_qparams: tuple[float, int] | None = None
) -> torch.Tensor | None:
    """The layer in the ops Inductor's x86 int8 passes fuse (freezing on); None where none applies.

    Static / dynamic per tensor: `quantize_per_tensor -> dequantize_per_tensor -> linear` with a
    `dequantize_per_channel` int8 weight (the PT2E pattern, lowered to `qlinear_pointwise`).
    `act_qparams` gives a static layer's (scale, zero_point) as Python numbers: the exact PT2E
    form, which also lets Inductor fuse GELU and the next layer's quantization into the GEMM.
    Dynamic per token: `_int_mm(q, w.T) * x_scale * w_scale + bias` (the SmoothQuant pattern,
    lowered to `qlinear_pointwise` with the per-row scale in a fused epilogue). For bf16 inputs
    (or under bf16 autocast) the GEMM runs int8 with bf16 output.
    """
    act = module.act
    if not decomposed_linear_applies(module):
        return None  # weight-only: the reference forward (Inductor folds its dequantized weight)
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    ws = module.weight_scheme
    scale_w = module.weight_scale.reshape(-1)
    if ws.granularity == "tensor":
        scale_w = scale_w.expand(module.out_features)
    if act.mode == "dynamic" and act.granularity == "token":
        return _per_token_int_mm(module, x, scale_w, dt)
    zp_w = module.weight_zero_point.reshape(-1).expand(module.out_features)
    scheme = act.scheme
    lo, hi, qdtype = scheme.qmin, scheme.qmax, torch.int8 if scheme.symmetric else torch.uint8
    if act_qparams is not None:
        qx = _qd.quantize_per_tensor(x, act_qparams[0], act_qparams[1], lo, hi, qdtype)
        dqx = _qd.dequantize_per_tensor(qx, act_qparams[0], act_qparams[1], lo, hi, qdtype)
    else:
        if act.mode == "static":
            # shape (1,): Inductor turns 0-d constants into scalars, which its int8 lowering rejects
            scale, zp = module.act_scale.reshape(1), module.act_zero_point.reshape(1)
        else:
            scale, zp = qparams_from_range(*reduce_range(x, scheme), scheme)
        qx = _qd.quantize_per_tensor.tensor(x, scale, zp, lo, hi, qdtype)
        dqx = _qd.dequantize_per_tensor.tensor(qx, scale, zp, lo, hi, qdtype)
    w = _qd.dequantize_per_channel(module.weight_q, scale_w, zp_w, 0, ws.qmin, ws.qmax, torch.int8)
    bias = None if module.bias is None else _cast(module.bias, dt)
    return F.linear(_cast(dqx, dt), _cast(w, dt), bias)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # No-op casts stay out of the traced graph: an extra user of a dequant node breaks Inductor's pattern.
    return x if x.dtype == dtype else x.to(dtype)


def _per_token_int_mm(module: nn.Module, x: torch.Tensor, scale_w: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    scheme = module.act.scheme
    lead, k = x.shape[:-1], x.shape[-1]
    xf = _cast(x, torch.float32)
    scale, zp = qparams_from_range(*reduce_range(xf, scheme), scheme)  # (..., 1) each
    # asymmetric tokens land in the signed range with the zero point shifted by 128
    shift = 0 if scheme.symmetric else 128
    q = (torch.round(xf / scale) + (zp - shift)).clamp(scheme.qmin - shift, scheme.qmax - shift).to(torch.int8)
    acc = torch._int_mm(q.reshape(-1, k), module.weight_q.t())  # (M, N) int32
    y = (acc.to(torch.float32) * scale.reshape(-1, 1) * scale_w).reshape(*lead, module.out_features)
    if not scheme.symmetric:
        colsum = module.weight_q.sum(dim=1, dtype=torch.int32).float() * scale_w  # (N,)
        y = y - ((zp - shift).float() * scale) * colsum
    if module.bias is not None:
        y = y + module.bias
    return _cast(y, dt)
