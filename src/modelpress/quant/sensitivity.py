"""Per-layer sensitivity and mixed precision: keep the layers that hurt most in higher precision.

Sensitivity of a layer = the quality drop when that layer alone is quantized. The selection
then quantizes everything at the low precision and, while the quality budget is not met,
promotes the most sensitive layers (to `high_bits`, or to float) — a binary search over how
many of them are promoted, each candidate measured on the whole model.

    >>> cfg = MixedPrecisionConfig(base=WeightOnlyConfig(bits=4), high_bits=8, max_drop=0.005)
    >>> model = quantize(model, cfg, data=batches)      # report lists the sensitivity table
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.config import Config
from modelpress.core.context import Context
from modelpress.core.errors import ConfigError, DataError
from modelpress.core.modules import run_batch, take_batches
from modelpress.core.registry import apply, register
from modelpress.quant.fold import fold_conv_bn
from modelpress.quant.ptq import (
    DynamicQuantConfig,
    LayerFilter,
    StaticQuantConfig,
    WeightOnlyConfig,
)

Metric = Callable[[nn.Module], float]  # higher is better
LAYER_RANKING_FROM = 64  # layers: past this, "auto" ranks them by their own output error, not the model's


@dataclass(frozen=True)
class MixedPrecisionConfig(Config):
    """Quantize with `base`, keeping the most sensitive layers at `high_bits` (None: float) within `max_drop`.

    The drop is measured by `metric`: "fidelity" (mean cosine of the outputs to the float model on
    the calibration batches; drop = 1 - cosine) or "task" (the zoo entry's metric, slower).
    """

    stage = "quantize"

    base: WeightOnlyConfig | DynamicQuantConfig | StaticQuantConfig = WeightOnlyConfig(
        bits=4, granularity="group", group_size=32
    )
    high_bits: int | None = 8
    max_drop: float = 0.005
    metric: str = "fidelity"
    eval_batches: int = 8
    # How the layers are ranked before the binary search: "model" (each layer quantized alone and the whole
    # model scored: one forward pass over the eval batches per layer), "layer" (each layer's own output error
    # on its calibration inputs, dW_o H dW_o^T / W_o H W_o^T per output channel o averaged, with H the second
    # moment of its inputs: every layer in one calibration pass; weight error only; `layer_sensitivity`), or
    # "auto": "layer" for weight-only quantization of a
    # model with more than LAYER_RANKING_FROM layers (an LLM's hundreds), else "model".
    ranking: str = "auto"

    def validate(self) -> None:
        if self.high_bits is not None and not 2 <= self.high_bits <= 8:
            raise ConfigError(f"high_bits must be in [2, 8] or null (float), got {self.high_bits}")
        if self.max_drop < 0:
            raise ConfigError(f"max_drop must be >= 0, got {self.max_drop}")
        if self.metric not in ("fidelity", "task"):
            raise ConfigError(f"metric must be 'fidelity' or 'task', got {self.metric!r}")
        if self.ranking not in ("auto", "model", "layer"):
            raise ConfigError(f"ranking must be 'auto', 'model' or 'layer', got {self.ranking!r}")
        if self.ranking == "layer" and not isinstance(self.base, WeightOnlyConfig):
            raise ConfigError(f"ranking 'layer' ranks weight error only: it needs a WeightOnlyConfig base, "
                              f"got {type(self.base).__name__}")  # fmt: skip


@dataclass
class SensitivityRow:
    layer: str
    params: int
    quality: float  # metric with only this layer quantized
    drop: float  # baseline metric minus quality


def fidelity_metric(reference: nn.Module, batches: Sequence[Any]) -> Metric:
    """Mean cosine similarity of a model's outputs to `reference`'s, per sample, over `batches`."""
    with torch.inference_mode():
        ref_out = [_flat(run_batch(reference, b)) for b in batches]

    def metric(model: nn.Module) -> float:
        with torch.inference_mode():
            outs = [_flat(run_batch(model, b)) for b in batches]
            cos = [F.cosine_similarity(o, r, dim=-1) for o, r in zip(outs, ref_out, strict=True)]
        return float(torch.cat(cos).mean())

    return metric


def _flat(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out.float().reshape(out.shape[0], -1)


def _exact(name: str) -> LayerFilter:
    return LayerFilter(include=(f"^{re.escape(name)}$",))


def _layer_names(model: nn.Module, cfg: Any) -> list[str]:
    """The layers `cfg` would quantize (a conv under a group-wise scheme is not one of them)."""
    from modelpress.quant.ptq import select_layers, why_not_quantizable

    scheme = cfg.weight_scheme()
    return [n for n, m in select_layers(model, cfg.layers) if why_not_quantizable(m, scheme) is None]


def sensitivity(model: nn.Module, cfg: Any, metric: Metric, ctx: Context) -> tuple[float, list[SensitivityRow]]:
    """Baseline metric and one row per layer: the metric with only that layer quantized by `cfg`."""
    base = metric(model)
    rows = []
    for name in ctx.progress(_layer_names(model, cfg), "sensitivity"):
        trial = copy.deepcopy(model)
        trial = apply(trial, dataclasses.replace(cfg, layers=_exact(name)), ctx.quiet())
        q = metric(trial)
        params = sum(p.numel() for p in model.get_submodule(name).parameters())
        rows.append(SensitivityRow(name, params, q, base - q))
    rows.sort(key=lambda r: r.drop, reverse=True)
    return base, rows


def layer_sensitivity(
    model: nn.Module, cfg: WeightOnlyConfig, batches: Sequence[Any], ctx: Context, names: Sequence[str] | None = None
) -> list[SensitivityRow]:
    """One row per layer, most sensitive first: `drop` is the layer's relative output error under `cfg`'s weight
    grid (rounded to nearest) on its calibration inputs, per output channel o, dW_o H dW_o^T / W_o H W_o^T, averaged
    over the channels; `quality` is 1 - drop. Per channel, not over the whole output: a layer writing one massive
    activation (SmolLM2's block 11 `down_proj`, an output of 24,000 where the others are near 6) has a tiny error
    relative to its whole output, while the error its massive inputs spread into every other channel is as large
    as those channels; ranked on the whole output it came 188th of 210, and every layer before it was promoted.
    The second moments H of every layer come from one pass over `batches` (in chunks, `quant.rounding`).
    `names`: the layers `cfg` quantizes, when the caller has them already."""
    from modelpress.primitives.affine import QuantScheme, dequantize_tensor, quantize_tensor
    from modelpress.quant.ptq import bits_for
    from modelpress.quant.rounding import layer_columns, layer_hessians

    modules = {n: model.get_submodule(n) for n in (_layer_names(model, cfg) if names is None else names)}
    base = cfg.weight_scheme()
    rows = []
    hessians = layer_hessians(model, modules, batches, len(batches))
    for name, h in ctx.progress(hessians, "sensitivity (per layer)", total=len(modules)):
        module = modules[name]
        scheme = QuantScheme(bits_for(cfg, name), base.symmetric, base.granularity, base.axis, base.group_size)
        w = module.weight.detach().float()
        dw = dequantize_tensor(quantize_tensor(w, scheme)) - w
        groups, k = layer_columns(module)
        dw, w, h = dw.reshape(groups, -1, k), w.reshape(groups, -1, k), h.float()
        err = torch.einsum("gok,gkl,gol->go", dw, h, dw)
        energy = torch.einsum("gok,gkl,gol->go", w, h, w)
        rel = float(torch.where(energy > 0, err / energy.clamp_min(1e-30), 0.0).mean())
        rows.append(SensitivityRow(name, sum(p.numel() for p in module.parameters()), 1.0 - rel, rel))
    rows.sort(key=lambda r: r.drop, reverse=True)
    return rows


def ranking_of(cfg: MixedPrecisionConfig, layers: int) -> str:
    """The ranking `cfg` asks for, "auto" resolved for a model with `layers` quantizable layers."""
    if cfg.ranking != "auto":
        return cfg.ranking
    return "layer" if isinstance(cfg.base, WeightOnlyConfig) and layers > LAYER_RANKING_FROM else "model"


def _rankable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))


def promote(cfg: MixedPrecisionConfig, names: Sequence[str]) -> Any:
    """The base config with the layers `names` kept in float (excluded) or at `high_bits` (`layer_bits`)."""
    exact = [f"^{re.escape(n)}$" for n in names]
    if cfg.high_bits is None:
        excluded = cfg.base.layers.exclude + tuple(exact)
        return dataclasses.replace(cfg.base, layers=dataclasses.replace(cfg.base.layers, exclude=excluded))
    promoted = dict.fromkeys(exact, cfg.high_bits)
    return dataclasses.replace(cfg.base, layer_bits={**promoted, **cfg.base.layer_bits})


@register(MixedPrecisionConfig)
def mixed_precision(model: nn.Module, cfg: MixedPrecisionConfig, ctx: Context) -> nn.Module:
    start = time.perf_counter()
    if ctx.data is None:
        raise DataError("mixed precision needs input batches to measure sensitivity (data=... / --data)")
    batches = take_batches(ctx.data, cfg.eval_batches)
    if not batches:
        raise DataError("the calibration set is empty: mixed precision needs real input batches")
    if isinstance(cfg.base, StaticQuantConfig) and cfg.base.fold_bn:
        fold_conv_bn(model, batches[0])  # once, so every trial sees the same folded float model
    if cfg.metric == "task":
        if ctx.metric is None:
            raise DataError("metric='task' needs the zoo entry's evaluation (a zoo model), or use 'fidelity'")
        metric = ctx.metric
    else:
        metric = fidelity_metric(model, batches)
    names = _layer_names(model, cfg.base)
    ranking = ranking_of(cfg, len(names))
    if ranking == "layer" and not all(_rankable(model.get_submodule(n)) for n in names):
        if cfg.ranking == "layer":
            raise ConfigError("ranking 'layer' scores Linear and Conv1d/Conv2d layers only; this model has others: "
                              "use ranking 'model'")  # fmt: skip
        ranking = "model"
    if ranking == "layer":
        base, rows = metric(model), layer_sensitivity(model, cfg.base, batches, ctx, names)  # type: ignore[arg-type]
    else:
        base, rows = sensitivity(model, cfg.base, metric, ctx)
    order = [r.layer for r in rows]

    def trial(k: int) -> tuple[nn.Module, float]:
        if k == len(order) and cfg.high_bits is None:  # every layer promoted to float
            return copy.deepcopy(model), base
        m = apply(copy.deepcopy(model), promote(cfg, order[:k]), ctx.quiet())
        return m, metric(m)

    # Binary search for the fewest promoted layers that meet the budget (quality grows with k).
    lo, hi = 0, len(order)
    best: tuple[int, nn.Module, float] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        m, q = trial(mid)
        if base - q <= cfg.max_drop:
            best, hi = (mid, m, q), mid - 1
        else:
            lo = mid + 1
    if best is None:  # even promoting every layer misses the budget (possible with high_bits set)
        k = len(order)
        m, q = trial(k)
        best = (k, m, q)
        ctx.warn(
            f"mixed precision: quality drop {base - q:.4g} exceeds max_drop {cfg.max_drop} even with "
            f"every layer at {cfg.high_bits} bits"
        )
    k, qmodel, quality = best
    ctx.report.add_pass(
        "quantize/mixed-precision",
        time.perf_counter() - start,
        metric=cfg.metric,
        ranking=ranking,
        baseline=base,
        quality=quality,
        drop=base - quality,
        max_drop=cfg.max_drop,
        promoted=order[:k],
        high_bits=cfg.high_bits,
        low_bits=cfg.base.bits,
        sensitivity=[dataclasses.asdict(r) for r in rows],
    )
    return qmodel
