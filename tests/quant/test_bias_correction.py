"""Bias correction: the mean output shift of rounded convolution weights is folded back into the bias."""

from __future__ import annotations

import copy

import torch
from torch import nn

from modelpress.quant import StaticQuantConfig, WeightOnlyConfig, quantize


def _depthwise_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        net[0].weight.mul_(4)  # coarse per-channel steps: rounding shifts each channel's mean output
    return net


def _mean_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).mean((0, 2, 3)).abs().mean())


def test_correction_removes_the_mean_shift_of_4_bit_depthwise_weights() -> None:
    net, x = _depthwise_net(), torch.rand(16, 8, 12, 12) * 3 + 1  # inputs with a non-zero mean
    data = [(x[i : i + 4],) for i in range(0, 16, 4)]
    plain = quantize(net, WeightOnlyConfig(bits=4, bias_correction=False), data=data)
    corrected = quantize(net, WeightOnlyConfig(bits=4), data=data)
    before, after = _mean_error(plain, net, x), _mean_error(corrected, net, x)
    assert after < 0.3 * before, (before, after)
    assert corrected[0].bias is not None and not torch.equal(corrected[0].bias, net[0].bias)


def test_no_data_no_correction_and_the_report_names_the_layers() -> None:
    from modelpress.core import Context, RunOptions

    net = _depthwise_net()
    without = quantize(copy.deepcopy(net), WeightOnlyConfig(bits=8))  # no data: nothing to measure
    torch.testing.assert_close(without[0].bias, net[0].bias)
    ctx = Context(options=RunOptions(progress=False))
    data = [(torch.rand(4, 8, 12, 12),)]
    quantize(net, StaticQuantConfig(calibration_batches=1), data=data, ctx=ctx)
    assert ctx.report.passes[-1].stats["bias_corrected"] == ["0", "2"]
