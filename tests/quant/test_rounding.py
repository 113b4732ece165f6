"""GPTQ rounding in the PTQ passes (`weight_rounding: gptq`): second moments of convolution patches, codes on
the nearest-rounding grid, a lower layer output error, and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.errors import ConfigError, DataError
from modelpress.primitives.affine import QuantScheme
from modelpress.primitives.gptq import gptq_quantize, gptq_quantize_grouped
from modelpress.quant.ptq import StaticQuantConfig, WeightOnlyConfig, quantize
from modelpress.quant.rounding import layer_hessians


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(6, 4, 3, stride=2, padding=1), (3, 6, 9, 11)),
        (nn.Conv2d(6, 6, 5, padding="same", dilation=2, groups=6), (2, 6, 12, 12)),
        (nn.Conv2d(6, 4, 3, padding="valid", groups=2), (2, 6, 8, 8)),
        (nn.Conv1d(4, 8, 3, padding=2, stride=2), (3, 4, 20)),
        (nn.Linear(7, 5), (3, 4, 7)),
    ],
)
def test_a_layers_second_moment_gives_its_output_energy(layer: nn.Module, shape: tuple[int, ...]) -> None:
    """For any weight row w of a group, w^T H w is the energy of that output channel: H covers padding,
    stride, dilation and groups exactly as the layer computes."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = nn.Sequential(layer)
    (name, h), *rest = list(layer_hessians(model, {"0": layer}, [(x,)], 1))
    assert name == "0" and not rest
    groups = getattr(layer, "groups", 1)
    with torch.no_grad():
        layer.bias.zero_()
        out = layer(x)
    out = out.movedim(-1, 1) if isinstance(layer, nn.Linear) else out  # channels on axis 1
    energy = out.transpose(0, 1).reshape(out.shape[1], -1).pow(2).sum(1)  # per output channel
    w = layer.weight.detach().reshape(groups, layer.weight.shape[0] // groups, -1)
    expected = torch.einsum("grk,gkj,grj->gr", w, h, w).reshape(-1)
    torch.testing.assert_close(expected, energy, rtol=1e-4, atol=1e-3)


def test_grouped_gptq_solves_each_group_as_the_single_solver_does() -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 2, 9)
    x = torch.randn(6, 100, 9) @ torch.randn(9, 9)
    h = x.transpose(1, 2) @ x
    scheme = QuantScheme(4, True, "channel")
    codes, scale, _ = gptq_quantize_grouped(w, h, scheme)
    for g in range(6):
        single = gptq_quantize(w[g], h[g], scheme, act_order=False)
        assert torch.equal(single.q.reshape(2, 9).to(codes.dtype), codes[g])
        torch.testing.assert_close(single.scale.reshape(2, 1), scale[g])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dw(F.relu(self.conv(x))).mean((2, 3)))


def _correlated_batches(n: int, seed: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 12, 12, generator=g)
    return [((base[i : i + 1] * torch.tensor([1.0, 0.9, -0.8]).view(1, 3, 1, 1)
              + 0.1 * torch.randn(1, 3, 12, 12, generator=g)),) for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("name", ["conv", "dw", "fc"])
def test_gptq_rounding_keeps_the_grid_and_lowers_the_layers_output_error(name: str) -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    data = _correlated_batches(16, 0)
    nearest = quantize(model, WeightOnlyConfig(bits=3, bias_correction=False), data=data)
    gptq = quantize(model, WeightOnlyConfig(bits=3, bias_correction=False, weight_rounding="gptq"), data=data)
    a, b = nearest.get_submodule(name), gptq.get_submodule(name)
    torch.testing.assert_close(a.weight_scale, b.weight_scale)  # the same grid, other codes
    assert not torch.equal(a.weight_q, b.weight_q)
    scheme = b.weight_scheme
    assert scheme.qmin <= int(b.weight_q.min()) and int(b.weight_q.max()) <= scheme.qmax

    inputs: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        for batch in data:
            model(*batch)
        handle.remove()
        x = torch.cat(inputs)
        ref = model.get_submodule(name)(x)
        err_nearest = (a(x) - ref).pow(2).mean()
        err_gptq = (b(x) - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_nearest, (float(err_gptq), float(err_nearest))


def test_static_quantization_with_gptq_rounding_reports_it() -> None:
    from modelpress.core.context import Context

    ctx = Context()
    data = _correlated_batches(8, 1)
    q = quantize(_Net().eval(), StaticQuantConfig(weight_rounding="gptq", calibration_batches=8), data=data, ctx=ctx)
    assert ctx.report.passes[-1].stats["weight_rounding"] == "gptq"
    assert torch.isfinite(q(*data[0])).all()


def test_bad_rounding_choices_are_refused() -> None:
    with pytest.raises(ConfigError, match="weight_rounding must be 'nearest' or 'gptq', got 'adaround'"):
        WeightOnlyConfig(weight_rounding="adaround")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="per output channel or per group"):
        StaticQuantConfig(per_channel=False, weight_rounding="gptq")
    with pytest.raises(ConfigError, match="per output channel or per group"):
        WeightOnlyConfig(granularity="tensor", weight_rounding="gptq")
    with pytest.raises(DataError, match="weight_rounding 'gptq' needs calibration data"):
        quantize(_Net().eval(), WeightOnlyConfig(weight_rounding="gptq"))


def test_depthwise_float_keeps_only_the_depthwise_convolutions_in_float() -> None:
    """`depthwise: float`: a depthwise convolution keeps its float weights, a grouped (not depthwise) one and the
    pointwise ones are quantized; the pass lists what it kept; a bad value is refused."""
    from modelpress.core.context import Context
    from modelpress.quant.modules import QConv

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 3, groups=2),
                        nn.Conv2d(8, 2, 1))  # fmt: skip
    data = [(torch.randn(2, 4, 10, 10),) for _ in range(2)]
    ctx = Context()
    q = quantize(net, WeightOnlyConfig(bits=8, depthwise="float"), data=data, ctx=ctx)
    assert [isinstance(m, QConv) for m in q] == [True, False, True, True]
    assert torch.equal(q[1].weight, net[1].weight)
    (entry,) = [p for p in ctx.report.passes if p.name == "quantize/weight-only"]
    assert entry.stats["depthwise_kept_float"] == ["1"]
    with pytest.raises(ConfigError, match="depthwise must be"):
        WeightOnlyConfig(depthwise="int4")  # type: ignore[arg-type]
