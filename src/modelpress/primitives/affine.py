"""Affine (linear) quantization: pure functions on tensors, 2–16 bits.

The textbook procedure: divide by a scale so the values land in the integer range, shift by a
zero point, round to the nearest integer (ties to even, `torch.round`), clamp; dequantize by
`(q - zero_point) * scale`.

- symmetric: signed range `[-2^(b-1), 2^(b-1) - 1]`, zero point 0, `scale = absmax / (2^(b-1) - 1)`.
- asymmetric: unsigned range `[0, 2^b - 1]`, `scale = (max - min) / (2^b - 1)`, the range always
  contains 0 so that zero is exact (padding, ReLU outputs).
- granularity: one scale per tensor, per channel (along `axis`), per group of `group_size`
  consecutive values along the last axis, or per token (one scale per row of the last axis,
  for activations quantized at run time).
- a last axis that `group_size` does not divide ends in a short group with its own scale: the
  grouped view pads it with zero values up to a whole group. The range always contains 0, so the
  padding changes no scale or zero point, its codes are the zero point (dequantized to exactly 0),
  and `ungroup` cuts it off again. A group wider than the axis is one group per row.

    >>> scheme = QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32)
    >>> qt = quantize_tensor(weight, scheme)        # QTensor(q int8, scale, zero_point)
    >>> w_hat = dequantize_tensor(qt)               # |w - w_hat| <= scale / 2 inside the range
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from modelpress.core.config import Config
from modelpress.core.errors import ConfigError

Granularity = Literal["tensor", "channel", "group", "token"]
MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class QuantScheme(Config):
    """How one tensor is quantized: bit width, symmetry, granularity."""

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0  # channel axis for granularity="channel" (0: output channels of a weight)
    group_size: int = 128  # values per scale along the last axis for granularity="group"

    def validate(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.granularity == "group" and self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """Smallest torch integer dtype that holds the range (before sub-byte packing)."""
        if self.bits <= 8:
            return torch.int8 if self.symmetric else torch.uint8
        return torch.int16 if self.symmetric else torch.int32


@dataclass
class QTensor:
    """Integer values with their scale and zero point (broadcastable against `q` after `group_view`)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    scheme: QuantScheme
    shape: torch.Size  # the original float shape


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) that map `[min_val, max_val]` (elementwise) onto the scheme's integers."""
    min_val = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_val = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    if scheme.symmetric:
        scale = torch.maximum(-min_val, max_val) / scheme.qmax
    else:
        scale = (max_val - min_val) / (scheme.qmax - scheme.qmin)
    # An all-zero slice would give scale 0: any positive scale represents it exactly. A subnormal
    # scale (ranges narrower than ~1e-33) loses the precision rounding needs: floor at the smallest normal.
    scale = torch.where(scale > 0, scale.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(scale))
    if scheme.symmetric:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zero_point = (scheme.qmin - torch.round(min_val / scale)).clamp(scheme.qmin, scheme.qmax).to(torch.int32)
    return scale, zero_point


def n_groups(width: int, group_size: int) -> int:
    """Groups of `group_size` along a last axis of `width` values, a short last group included."""
    return -(-width // group_size)


def group_view(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """`x` reshaped so that a per-group scale broadcasts: (..., n_groups, group_size) for groups.

    A ragged last group is padded with zeros (see the module docstring); `ungroup` undoes this.
    """
    if scheme.granularity != "group":
        return x
    last, gs = x.shape[-1], scheme.group_size
    groups = n_groups(last, gs)
    if groups * gs != last:
        x = torch.nn.functional.pad(x, (0, groups * gs - last))  # zero columns up to a whole group
    return x.reshape(*x.shape[:-1], groups, gs)  # (..., G, group_size)


def ungroup(xv: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of `group_view`: the grouped (..., G, group_size) values back in `shape`, padding cut off."""
    lead, width = tuple(shape[:-1]), shape[-1]
    if tuple(xv.shape) == tuple(shape):
        return xv
    flat = xv.reshape(*lead, -1)  # (..., G * group_size)
    return flat[..., :width] if flat.shape[-1] != width else flat


def group_codes(q: torch.Tensor, zero_point: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Codes (..., K) in the grouped layout (..., G, group_size), padding columns set to the zero point.

    `zero_point` broadcasts against the grouped codes ((..., G, 1)); padded codes dequantize to 0.
    """
    grouped = group_view(q, scheme)
    width, padded = q.shape[-1], grouped.shape[-2] * grouped.shape[-1]
    if scheme.granularity != "group" or width == padded:
        return grouped
    pad = torch.arange(padded, device=q.device).view(grouped.shape[-2:]) >= width  # (G, group_size)
    return torch.where(pad, zero_point.to(q.dtype), grouped)


def reduce_range(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `x` per quantization slice, shaped to broadcast against `group_view(x)`."""
    xv = group_view(x.detach(), scheme)
    if scheme.granularity == "tensor":
        return xv.amin(), xv.amax()
    if scheme.granularity == "channel":
        axis = scheme.axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        return xv.amin(dim=dims, keepdim=True), xv.amax(dim=dims, keepdim=True)
    # group: reduce within each group; token: within each row of the last axis
    return xv.amin(dim=-1, keepdim=True), xv.amax(dim=-1, keepdim=True)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integers `clamp(round(x / scale) + zero_point)` in the scheme's storage dtype."""
    q = torch.round(x / scale) + zero_point
    return q.clamp(scheme.qmin, scheme.qmax).to(scheme.storage_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Float values `(q - zero_point) * scale`."""
    return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale


def quantize_tensor(
    x: torch.Tensor,
    scheme: QuantScheme,
    min_val: torch.Tensor | None = None,
    max_val: torch.Tensor | None = None,
) -> QTensor:
    """Quantize `x`; the range comes from `x` itself unless an observer supplies `min_val`/`max_val`."""
    if not torch.isfinite(x).all():
        raise ValueError(f"cannot quantize a tensor with non-finite values (shape {tuple(x.shape)})")
    if min_val is None or max_val is None:
        min_val, max_val = reduce_range(x, scheme)
    scale, zero_point = qparams_from_range(min_val, max_val, scheme)
    q = quantize(group_view(x.float(), scheme), scale, zero_point, scheme)
    return QTensor(q, scale, zero_point, scheme, x.shape)


def dequantize_tensor(qt: QTensor) -> torch.Tensor:
    return ungroup(dequantize(qt.q, qt.scale, qt.zero_point), qt.shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Quantize then dequantize in float: the value the integer kernel will see."""
    xv = group_view(x, scheme)
    q = (torch.round(xv / scale) + zero_point).clamp(scheme.qmin, scheme.qmax)
    return ungroup((q - zero_point) * scale, x.shape).to(x.dtype)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; 8-bit weights give ~40 dB)."""
    noise = (x.float() - x_hat.float()).pow(2).mean()
    signal = x.float().pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise).detach())
