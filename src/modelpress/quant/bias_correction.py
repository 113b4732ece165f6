"""Bias correction: the mean output error that rounding a convolution's weights causes, folded into its bias.

Rounding a weight to its integer grid moves each output channel's mean by `sum(ΔW) · E[x]` (per input
channel, over the kernel's positions), where `ΔW` is the float weight minus the dequantized one and `E[x]`
the mean of the layer's input on the calibration data. Depthwise convolutions (nine or 25 weights per
channel, one scale each) carry most of that shift in MobileNet / EfficientNet-style networks; adding it
back to the bias removes it (Nagel et al., "Data-Free Quantization", 2019, the empirical variant with
input means measured on calibration data). Zero padding at the borders is not modelled.

    >>> means = conv_input_means(model, ["features.3.conv"], batches, 16)   # on the float model
    >>> ... swap in the integer layers ...
    >>> correct_conv_biases(model, {"features.3.conv": float_conv}, means)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelpress.core.modules import run_hooked, take_batches


def conv_input_means(
    model: nn.Module, names: Sequence[str], data: Iterable[Any], batches: int
) -> dict[str, torch.Tensor]:
    """The per-channel mean of the input of each convolution in `names` over the first `batches` of `data`."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().float()
            channels = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * positions)
            sums[name] = sums.get(name, 0) + channels.sum(1)  # type: ignore[operator]
            counts[name] = counts.get(name, 0) + channels.shape[1]

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    run_hooked(model, handles, take_batches(data, batches))
    return {n: sums[n] / counts[n] for n in sums}


def correct_conv_biases(
    model: nn.Module, originals: Mapping[str, nn.Module], means: Mapping[str, torch.Tensor]
) -> list[str]:
    """Add each integer convolution's mean output error (its float original's weight against its dequantized
    weight, applied to the input means) to its bias; returns the names corrected."""
    done = []
    with torch.no_grad():
        for name, original in originals.items():
            layer = model.get_submodule(name)
            if name not in means or not hasattr(layer, "dequantized_weight"):
                continue
            error = original.weight.detach().float() - layer.dequantized_weight().float()  # (out, in / groups, k...)
            per_input = error.reshape(error.shape[0], error.shape[1], -1).sum(-1)  # (out, in / groups)
            groups = getattr(layer, "groups", 1)
            mu = means[name].reshape(groups, -1)  # (groups, in / groups)
            outs = per_input.reshape(groups, -1, per_input.shape[1])  # (groups, out / groups, in / groups)
            shift = torch.einsum("goi,gi->go", outs, mu).reshape(-1)
            if layer.bias is None:
                layer.bias = shift.clone()
            else:
                layer.bias.add_(shift.to(layer.bias.dtype))
            done.append(name)
    return done
