"""AWQ: activation-aware weight scaling and clipping for group-wise weight quantization (Lin et al., 2023).

Input channels that carry large activations matter most; scaling their weight columns up by `s`
(and the inputs down by `1 / s`, folded into the op that produces them) shrinks their relative
rounding error. The scale is `s = mean|x|^alpha`, normalised so that `sqrt(max(s) * min(s)) = 1`,
with `alpha` searched on a grid in [0, 1] for the smallest output error of the quantized layer on
calibration inputs. `alpha = 0` gives `s = 1` (plain round-to-nearest), so the chosen scale is never
worse than round-to-nearest on that objective. A clipping search then shrinks each group's range
where that lowers the group's output error. Pure tensor math: folding lives in `quant/awq.py`.

    >>> mag = activation_magnitude(x)                        # x: (T, K) inputs of the layer(s)
    >>> res = search_scale(weight, x, scheme, mag)           # weight: (N, K), may stack layers along N
    >>> lo, hi = search_clip(weight * res.scale, x / res.scale, scheme)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.core.errors import ConfigError
from modelpress.primitives.affine import QuantScheme, group_view, qparams_from_range, reduce_range, ungroup

MIN_SCALE = 1e-4


@dataclass
class ScaleSearch:
    """The chosen per-input-channel scale and how it compares to round-to-nearest."""

    scale: torch.Tensor  # (K,) multiply weight columns, divide inputs
    alpha: float
    error: float  # output MSE of the quantized layer(s) with `scale`
    rtn_error: float  # the same with s = 1


def activation_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute value of each input channel over all tokens: (..., K) -> (K,)."""
    return x.detach().reshape(-1, x.shape[-1]).float().abs().mean(dim=0)


def fake_quant_weight(
    weight: torch.Tensor, scheme: QuantScheme, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize `weight` (N, K) with `scheme`; the range is the weight's own unless given."""
    wv = group_view(weight.float(), scheme)  # (N, G, gs) for groups
    if lo is None or hi is None:
        lo, hi = reduce_range(weight.float(), scheme)
    scale, zp = qparams_from_range(lo, hi, scheme)
    q = (torch.round(wv / scale) + zp).clamp(scheme.qmin, scheme.qmax)
    return ungroup((q - zp) * scale, weight.shape)


def _output_mse(x: torch.Tensor, weight: torch.Tensor, weight_hat: torch.Tensor) -> float:
    return float((x @ (weight - weight_hat).t()).pow(2).mean())


def search_scale(
    weight: torch.Tensor,
    x: torch.Tensor,
    scheme: QuantScheme,
    act_mag: torch.Tensor | None = None,
    n_grid: int = 20,
) -> ScaleSearch:
    """Grid search over `alpha` in {0, 1/n_grid, ..., (n_grid-1)/n_grid} for the scale minimising output MSE.

    `weight` (N, K) may stack several layers that read the same input (Q, K, V) along N: they share
    one scale because one op in front of them absorbs `1 / s`. `x` (T, K) are calibration inputs.
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ConfigError(f"inputs (..., {x.shape[-1]}) do not fit a weight of shape {tuple(weight.shape)}")
    if n_grid < 1:
        raise ConfigError(f"n_grid must be >= 1, got {n_grid}")
    w = weight.detach().float()
    xs = x.detach().reshape(-1, x.shape[-1]).float()  # (T, K)
    mag = activation_magnitude(xs) if act_mag is None else act_mag.float()
    mag = mag.clamp(min=MIN_SCALE)
    best: ScaleSearch | None = None
    rtn = _output_mse(xs, w, fake_quant_weight(w, scheme))
    for step in range(n_grid):
        alpha = step / n_grid
        s = mag.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=MIN_SCALE)  # (K,)
        w_hat = fake_quant_weight(w * s, scheme) / s
        err = rtn if step == 0 else _output_mse(xs, w, w_hat)
        if best is None or err < best.error:
            best = ScaleSearch(s if step else torch.ones_like(s), alpha, err, rtn)
    assert best is not None
    return best


def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    scheme: QuantScheme,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) range, each shrunk by the factor in [1 - max_shrink, 1] with the least output error.

    The error of a group is measured on its own slice of the inputs, `x_g @ (w_g - q(w_g))^T`, so all
    groups are searched at once (a short last group is padded with zero weights and zero inputs, which
    add no error). Returns `(lo, hi)` shaped like `reduce_range` gives them, ready as `QLinear`'s
    `weight_range`.
    """
    if scheme.granularity != "group":
        raise ConfigError(f"clipping search applies to group-wise weights, got {scheme.granularity!r}")
    if not 0 <= max_shrink < 1:
        raise ConfigError(f"max_shrink must be in [0, 1), got {max_shrink}")
    w = weight.detach().float()
    xs = x.detach().reshape(-1, x.shape[-1]).float()
    if xs.shape[0] > max_tokens:  # evenly spaced tokens: enough for a per-group range choice
        xs = xs[torch.linspace(0, xs.shape[0] - 1, max_tokens).long()]
    wv = group_view(w, scheme)  # (N, G, gs)
    xv = group_view(xs, scheme)  # (T, G, gs)
    lo0, hi0 = wv.amin(dim=-1, keepdim=True), wv.amax(dim=-1, keepdim=True)  # (N, G, 1)
    best_err = torch.full(lo0.shape, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for step in range(int(round(n_grid * max_shrink)) + 1):
        ratio = 1 - step / n_grid
        lo, hi = lo0 * ratio, hi0 * ratio
        scale, zp = qparams_from_range(lo, hi, scheme)
        w_hat = ((torch.round(wv / scale) + zp).clamp(scheme.qmin, scheme.qmax) - zp) * scale
        diff = wv - w_hat
        err = torch.cat(
            [  # (N, G, 1), in chunks of rows to bound the (T, rows, G) intermediate
                torch.einsum("tgk,ngk->tng", xv, diff[r : r + 256]).pow(2).mean(dim=0) for r in range(0, len(diff), 256)
            ]
        ).unsqueeze(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi
