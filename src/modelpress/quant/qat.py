"""Quantization-aware training: fake-quant layers with a straight-through estimator and learned ranges.

prepare → train → convert:

    >>> model = prepare_qat(model, QATConfig(bits=4), data=calibration_batches)
    >>> train(model)                          # any training loop; the ranges learn with the weights
    >>> model = convert_qat(model)            # QLinear / QConv with the learned scales

Weights get one learned clipping value per output channel (symmetric, `scale = alpha / qmax`),
activations a learned range `[lo, hi]` (asymmetric, initialized from calibration). Rounding uses
the straight-through estimator: the forward rounds, the backward passes the gradient through,
so the learned ranges get LSQ-style gradients from `clamp(round(x / s)) * s`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.config import Config
from modelpress.core.context import Context
from modelpress.core.errors import ConfigError, DataError
from modelpress.core.modules import first_batch, set_submodule
from modelpress.core.registry import register
from modelpress.primitives.affine import QuantScheme
from modelpress.quant.fold import fold_conv_bn
from modelpress.quant.modules import ActSpec, QConv, QLinear
from modelpress.quant.observers import ObserverConfig
from modelpress.quant.ptq import LayerFilter, calibrate, plan_layers


@dataclass(frozen=True)
class QATConfig(Config):
    """Fake-quantized training at `bits` weights / `act_bits` activations, then conversion."""

    stage = "quantize"

    bits: int = 4
    act_bits: int = 8
    quantize_activations: bool = True
    calibration_batches: int = 8
    layers: LayerFilter = LayerFilter()

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be in [2, 8], got {self.bits}")
        if not 2 <= self.act_bits <= 8:
            raise ConfigError(f"act_bits must be in [2, 8], got {self.act_bits}")

    def weight_scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, True, "channel")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def fake_quant_ste(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Differentiable fake quantization: gradients reach `x` (inside the range) and `scale`."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class FakeQuantLayer(nn.Module):
    """Wraps a Linear / Conv: its float weight trains, seen through learned weight and activation quantizers."""

    def __init__(
        self, layer: nn.Linear | nn.Conv1d | nn.Conv2d, bits: int, act_bits: int, act_range: tuple[float, float] | None
    ) -> None:
        super().__init__()
        self.layer = layer
        self.wscheme = QuantScheme(bits, True, "channel")
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        self.weight_alpha = nn.Parameter(w.abs().amax(dim=1).clamp(min=1e-8))  # (out,) clip values
        self.act_bits = act_bits
        if act_range is not None:
            lo, hi = min(act_range[0], 0.0), max(act_range[1], 0.0)
            self.act_lo = nn.Parameter(torch.tensor(lo))
            self.act_hi = nn.Parameter(torch.tensor(hi if hi > lo else lo + 1e-3))
        else:
            self.act_lo = self.act_hi = None  # type: ignore[assignment]

    def act_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = 2**self.act_bits - 1
        lo, hi = torch.clamp(self.act_lo, max=0.0), torch.clamp(self.act_hi, min=0.0)
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero_point = torch.clamp(round_ste(-lo / scale), 0, qmax)
        return scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_lo is not None:
            scale, zp = self.act_qparams()
            x = fake_quant_ste(x, scale, zp, 0, 2**self.act_bits - 1)
        w = self.layer.weight
        scale = (self.weight_alpha / self.wscheme.qmax).reshape(-1, *([1] * (w.dim() - 1)))
        wq = fake_quant_ste(w, scale, torch.zeros_like(scale), self.wscheme.qmin, self.wscheme.qmax)
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, wq, layer.bias)
        return layer._conv_forward(x, wq, layer.bias)  # type: ignore[union-attr]

    def to_quantized(self) -> QLinear | QConv:
        """The integer layer with the learned weight clipping values and activation range."""
        alpha = self.weight_alpha.detach().reshape(-1, 1)  # (out, 1): per-channel, on the flattened weight
        act, act_range = ActSpec(mode="none"), None
        if self.act_lo is not None:
            act = ActSpec(mode="static", bits=self.act_bits, symmetric=False)
            act_range = (float(self.act_lo.detach().clamp(max=0)), float(self.act_hi.detach().clamp(min=0)))
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return QLinear(layer.weight, layer.bias, self.wscheme, act, act_range, (-alpha, alpha))
        return QConv(layer, self.wscheme, act, act_range, (-alpha, alpha))


def prepare_qat(
    model: nn.Module, cfg: QATConfig, data: Iterable[Any] | None = None, ctx: Context | None = None
) -> nn.Module:
    """Fold Conv-BN, then wrap selected layers in `FakeQuantLayer`s (activation ranges from `data`), in place."""
    ctx = ctx or Context()
    fold_conv_bn(model, first_batch(data))
    model.eval()
    plans = plan_layers(model, cfg, ActSpec(mode="static", bits=cfg.act_bits, symmetric=False), ctx)
    if cfg.quantize_activations:
        if data is None:
            raise DataError("QAT with activation quantization needs calibration batches to initialize ranges")
        calibrate(
            model,
            plans,
            data,
            ObserverConfig(kind="minmax"),
            QuantScheme(cfg.act_bits, False),
            cfg.calibration_batches,
            ctx,
        )
    for p in plans:
        act_range = p.act_range if cfg.quantize_activations else None
        set_submodule(model, p.name, FakeQuantLayer(p.module, p.weight.bits, cfg.act_bits, act_range))
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every `FakeQuantLayer` by its integer layer, in place; returns the model in eval mode."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLayer):
            set_submodule(model, name, module.to_quantized())
    return model.eval()


@register(QATConfig)
def qat(model: nn.Module, cfg: QATConfig, ctx: Context) -> nn.Module:
    """prepare → `ctx.train_fn(model)` → convert."""
    train_fn = ctx.train_fn
    if train_fn is None:
        raise DataError(
            "quantization-aware training needs a training loop (a zoo model with training data, "
            "or Context(train_fn=...))"
        )
    start = time.perf_counter()
    prepare_qat(model, cfg, ctx.data, ctx)
    model = train_fn(model)
    convert_qat(model)
    ctx.report.add_pass("quantize/qat", time.perf_counter() - start, bits=cfg.bits, act_bits=cfg.act_bits)
    return model
