"""Conv-BN folding where torch.fx cannot trace the model: pairs found by watching one eager forward."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.quant.fold import fold_conv_bn


class _Untraceable(nn.Module):
    """conv_a -> bn_a (foldable); conv_b's output goes to bn_b and to a residual sum (not foldable); and a
    branch on the data, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # data-dependent control flow
            x = torch.relu(self.bn_a(self.conv_a(x)))
        y = self.conv_b(x)
        return self.bn_b(y) + y


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _Untraceable()
    for bn in (model.bn_a, model.bn_b):  # statistics that make folding change the weights
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_a_model_fx_cannot_trace_is_folded_from_one_eager_forward() -> None:
    model, x = _model(), torch.randn(2, 3, 16, 16)
    expected = model(x)
    folded = fold_conv_bn(model, (x,))
    assert folded == ["conv_a"]  # conv_b's output is also summed: folding bn_b would change the sum
    assert isinstance(model.bn_a, nn.Identity) and isinstance(model.bn_b, nn.BatchNorm2d)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_without_an_example_such_a_model_is_left_as_it_is() -> None:
    model = _model()
    assert fold_conv_bn(model) == [] and isinstance(model.bn_a, nn.BatchNorm2d)


def test_a_layer_that_overrides_forward_is_skipped_with_the_reason() -> None:
    from modelpress.core import Context, RunOptions
    from modelpress.quant import WeightOnlyConfig, quantize

    class PaddedConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # pads on its own: a QConv would not
            return super().forward(torch.nn.functional.pad(x, (0, 1, 0, 1)))

    model = nn.Sequential(PaddedConv(3, 4, 3, stride=2), nn.Conv2d(4, 4, 1)).eval()
    ctx = Context(options=RunOptions(progress=False))
    q = quantize(model, WeightOnlyConfig(bits=8), ctx=ctx)
    assert isinstance(q[0], PaddedConv) and type(q[1]).__name__ == "QConv"
    assert any("PaddedConv overrides Conv2d.forward" in w for w in ctx.report.warnings)
