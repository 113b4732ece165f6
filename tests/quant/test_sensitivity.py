from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core import ConfigError, Context, DataError, RunOptions
from modelpress.core.numerics import exact
from modelpress.quant import LayerFilter, MixedPrecisionConfig, QLinear, WeightOnlyConfig, quantize
from modelpress.quant.sensitivity import fidelity_metric, promote, sensitivity


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        model[2].weight[:, :4] *= 40  # a layer with outlier columns: the one low-bit quantization hurts most
    return model


def _data() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 32, generator=g),) for _ in range(4)]


def test_sensitivity_ranks_the_outlier_layer_first():
    model = _model()
    metric = fidelity_metric(model, _data())
    base, rows = sensitivity(model, WeightOnlyConfig(bits=4), metric, Context(options=RunOptions(progress=False)))
    assert base == pytest.approx(1.0, abs=1e-6)
    assert [r.layer for r in rows][0] == "2"
    assert all(rows[i].drop >= rows[i + 1].drop for i in range(len(rows) - 1))


@pytest.mark.parametrize("high_bits", [8, None])
def test_mixed_precision_meets_the_budget_with_fewest_promotions(high_bits):
    model = _model()
    data = _data()
    cfg = MixedPrecisionConfig(base=WeightOnlyConfig(bits=4), high_bits=high_bits, max_drop=0.01)
    ctx = Context(data=data, options=RunOptions(progress=False))
    qmodel = quantize(model, cfg, ctx=ctx)
    stats = ctx.report.passes[-1].stats
    assert stats["drop"] <= 0.01 and len(stats["sensitivity"]) == 3
    with exact():  # the pass measures on the exact path (`registry.apply`); eager forward may run bf16 kernels
        assert fidelity_metric(model, data)(qmodel) == pytest.approx(stats["quality"], abs=1e-6)
        all_low = fidelity_metric(model, data)(quantize(model, WeightOnlyConfig(bits=4)))
    assert 1 - all_low > 0.01  # the budget really needed promotions
    promoted = stats["promoted"]
    assert 1 <= len(promoted) < 3 and promoted[0] == "2"
    bits = {n: m.weight_bits() for n, m in qmodel.named_modules() if isinstance(m, QLinear)}
    for name in promoted:
        assert (bits.get(name) == 8) if high_bits == 8 else (name not in bits)


def test_mixed_precision_bad_input():
    with pytest.raises(ConfigError, match="metric must be 'fidelity' or 'task'"):
        MixedPrecisionConfig(metric="speed")
    with pytest.raises(DataError, match="needs input batches"):
        quantize(_model(), MixedPrecisionConfig())


@pytest.mark.parametrize("high_bits", [8, None])
def test_promotion_keeps_the_base_layer_filter_types(high_bits):
    layers = LayerFilter(include=("^[024]$",), exclude=("^4$",), types=("Linear",))
    cfg = MixedPrecisionConfig(base=WeightOnlyConfig(bits=4, layers=layers), high_bits=high_bits)
    qcfg = promote(cfg, ["2"])
    assert qcfg.layers.types == ("Linear",)  # promoting to float must not widen the filter to every type
    assert qcfg.layers.include == ("^[024]$",)
    if high_bits is None:
        assert qcfg.layers.exclude == ("^4$", "^2$") and qcfg.layer_bits == {}
    else:
        assert qcfg.layers == layers and qcfg.layer_bits == {"^2$": 8}


def test_layer_bits_give_single_layers_other_bits() -> None:
    model = _model()
    cfg = WeightOnlyConfig(bits=4, granularity="channel", layer_bits={"^2$": 8, "^[0-9]$": 6})
    q = quantize(model, cfg)
    assert [q[i].weight_bits() for i in (0, 2, 4)] == [6, 8, 6]  # the first matching pattern wins
    assert WeightOnlyConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="layer_bits"):
        WeightOnlyConfig(layer_bits={"^2$": 9})
    with pytest.raises(ConfigError, match="layer_bits"):
        WeightOnlyConfig(layer_bits={"(": 8})


def test_layer_ranking_scores_each_layers_own_output_error_in_one_pass():
    """ranking "layer": dW_o H dW_o^T / W_o H W_o^T per output channel, averaged, checked against the layer's
    output error computed directly; the outlier layer first; the same promotion search as "model"; "auto" picks
    it past 64 layers."""
    from modelpress.primitives.affine import dequantize_tensor, quantize_tensor
    from modelpress.quant.sensitivity import LAYER_RANKING_FROM, layer_sensitivity, ranking_of

    model, data = _model(), _data()
    cfg = WeightOnlyConfig(bits=4)
    rows = layer_sensitivity(model, cfg, data, Context(options=RunOptions(progress=False)))
    assert [r.layer for r in rows][0] == "2" and len(rows) == 3
    inputs: list[torch.Tensor] = []
    handle = model[2].register_forward_pre_hook(lambda m, x: inputs.append(x[0]))
    with torch.no_grad():
        for (x,) in data:
            model(x)
    handle.remove()
    x = torch.cat(inputs)
    w = model[2].weight.detach()
    dw = dequantize_tensor(quantize_tensor(w, cfg.weight_scheme())) - w
    direct = float(((x @ dw.T).pow(2).sum(0) / (x @ w.T).pow(2).sum(0)).mean())  # per output channel, averaged
    (row,) = [r for r in rows if r.layer == "2"]
    assert row.drop == pytest.approx(direct, rel=1e-4) and row.quality == pytest.approx(1 - direct, rel=1e-6)
    ctx = Context(data=data, options=RunOptions(progress=False))
    quantize(model, MixedPrecisionConfig(base=cfg, high_bits=8, max_drop=0.01, ranking="layer"), ctx=ctx)
    stats = ctx.report.passes[-1].stats
    assert stats["ranking"] == "layer" and stats["drop"] <= 0.01 and stats["promoted"][0] == "2"
    auto = MixedPrecisionConfig(base=cfg)
    assert ranking_of(auto, 3) == "model" and ranking_of(auto, LAYER_RANKING_FROM + 1) == "layer"
    from modelpress.quant import StaticQuantConfig

    assert ranking_of(MixedPrecisionConfig(base=StaticQuantConfig()), 1000) == "model"  # activations matter too
    with pytest.raises(ConfigError, match="ranking 'layer' ranks weight error only"):
        MixedPrecisionConfig(base=StaticQuantConfig(), ranking="layer")
    with pytest.raises(ConfigError, match="ranking must be"):
        MixedPrecisionConfig(ranking="fast")


def test_a_layer_writing_a_massive_activation_is_ranked_by_the_error_it_spreads_into_the_other_channels():
    """An LLM's massive-activation layer: one input feature and one output channel thousands of times larger than
    the rest, the weights reading that feature tiny. Relative to its whole output (dominated by the massive
    channel) its error is small; relative to each channel's own signal, it is the worst layer by far."""
    from modelpress.primitives.affine import dequantize_tensor, quantize_tensor
    from modelpress.quant.sensitivity import layer_sensitivity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        model[0].weight[0].abs_().mul_(0.0).add_(0.01)  # feature 0 of layer 2's input: always on...
        model[0].bias[0] = 3000.0  # ... and massive
        model[2].weight[1:, 0] *= 1e-3  # the other channels read it through tiny weights
        model[2].weight[0] *= 1000.0  # channel 0 writes the massive activation, its largest weight on feature 0
        model[2].weight[0, 0] = model[2].weight[0].abs().max()
    data, cfg = _data(), WeightOnlyConfig(bits=4, granularity="group", group_size=32)
    rows = layer_sensitivity(model, cfg, data, Context(options=RunOptions(progress=False)))
    assert [r.layer for r in rows][0] == "2"
    x = torch.relu(model[0](torch.cat([b[0] for b in data])))
    w = model[2].weight.detach()
    dw = dequantize_tensor(quantize_tensor(w, cfg.weight_scheme())) - w
    whole = float((x @ dw.T).pow(2).sum() / (x @ w.T).pow(2).sum())
    (last,) = [r for r in rows if r.layer == "4"]
    assert whole < last.drop  # ranked on its whole output, it would come after the plain layer
