"""GPTQ pass: config checks, exact codes in QLinear, and quality against round-to-nearest on a trained LM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core import ConfigError, Context, DataError, RunOptions, numerics
from modelpress.primitives.affine import QuantScheme, dequantize
from modelpress.primitives.gptq import gptq_quantize, hessian_update
from modelpress.quant import LayerFilter, QLinear, WeightOnlyConfig, quantize
from modelpress.quant.gptq import GPTQConfig, qlinear_from_codes
from modelpress.zoo.tinylm import SMALL_SPEC, TinyLMEntry, perplexity

NO_HEAD = LayerFilter(exclude=(r"lm_head$",))
RTN3 = WeightOnlyConfig(bits=3, symmetric=False, granularity="group", group_size=128, layers=NO_HEAD)


pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated_batches(n: int = 8, k: int = 64, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.linspace(0.2, 3.0, k)
    return [((torch.randn(32, k, generator=g) @ mix) * scale,) for _ in range(n)]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 9}, "bits must be in \\[2, 8\\], got 9"),
        ({"bits": 1}, "bits must be in \\[2, 8\\], got 1"),
        ({"group_size": -1}, "group_size must be >= 1"),
        ({"damp": 0.0}, "damp must be in \\(0, 1\\]"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"calibration_batches": 0}, "calibration_batches must be >= 1"),
        ({"head_bits": 9}, "head_bits must be in \\[2, 8\\] \\(or null: the head stays as `layers` says\\), got 9"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GPTQConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = GPTQConfig(bits=3, group_size=64, act_order=False)
    assert GPTQConfig.from_dict(cfg.to_dict()) == cfg


def test_qlinear_holds_exactly_the_gptq_codes():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    x = _correlated_batches(1)[0][0]
    h, _ = hessian_update(None, 0, x)
    scheme = QuantScheme(4, False, "group", group_size=32)
    res = gptq_quantize(linear.weight, h, scheme)
    q = qlinear_from_codes(linear, scheme, res.q, res.scale, res.zero_point)
    assert torch.equal(q.weight_q, res.q)
    assert torch.equal(q.weight_zero_point, res.zero_point)
    expected = x @ dequantize(res.q, res.scale, res.zero_point).reshape(16, 64).t() + linear.bias
    with numerics.exact():  # the codes' own arithmetic (eager 4-bit layers otherwise round activations to bf16)
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight_q of shape"):
        qlinear_from_codes(linear, scheme, res.q[:, :1], res.scale, res.zero_point)


def test_gptq_model_output_beats_round_to_nearest():
    model, data = _mlp(), _correlated_batches()
    ctx = Context(options=RunOptions(progress=False))
    with pytest.warns(UserWarning, match="no repeated block list"):
        gq = quantize(model, GPTQConfig(bits=3, group_size=32), data=data, ctx=ctx)
    rtn = quantize(model, WeightOnlyConfig(bits=3, symmetric=False, granularity="group", group_size=32))
    assert all(isinstance(m, QLinear) for m in (gq[0], gq[2]))
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        ref = model(x)
        gptq_err = (gq(x) - ref).pow(2).mean()
        rtn_err = (rtn(x) - ref).pow(2).mean()
    assert gptq_err < 0.8 * rtn_err
    (record,) = [p for p in ctx.report.passes if p.name == "quantize/gptq"]
    assert record.stats["layers"] == 2 and set(record.stats["loss"]) == {"0", "2"}


def test_a_width_the_group_does_not_divide_gets_a_short_last_group():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    ctx = Context(options=RunOptions(progress=False))
    q = quantize(model, GPTQConfig(group_size=32), data=_correlated_batches(2), ctx=ctx)
    assert isinstance(q[0], QLinear) and isinstance(q[2], QLinear)
    assert q[2].weight_q.shape == (8, 2, 32)  # 32 + a short group of 16, padded in storage
    assert not any("skipped" in w for w in ctx.report.warnings)


def test_gptq_needs_calibration_data():
    with pytest.raises(DataError, match="GPTQ needs calibration data"):
        quantize(_mlp(), GPTQConfig(), ctx=Context(options=RunOptions(progress=False)))


def test_gptq_on_tiny_lm_loses_less_perplexity_than_round_to_nearest(tiny_lm):
    model, base = tiny_lm
    data = TinyLMEntry(SMALL_SPEC).calibration_data(32, 8)
    ctx = Context(options=RunOptions(progress=False))
    gq = quantize(model, GPTQConfig(bits=3, group_size=128), data=data, ctx=ctx)
    rtn = quantize(model, RTN3)
    gptq_ppl, rtn_ppl = perplexity(gq), perplexity(rtn)
    assert rtn_ppl > base
    assert gptq_ppl - base < 0.5 * (rtn_ppl - base)
    n_linear = 7 * SMALL_SPEC.layers
    assert sum(isinstance(m, QLinear) for m in gq.modules()) == n_linear  # every block Linear, not the head
    assert isinstance(gq.lm.lm_head, nn.Linear)
    (record,) = [p for p in ctx.report.passes if p.name == "quantize/gptq"]
    assert record.stats["blocks"] == SMALL_SPEC.layers and record.stats["block_list"] == "lm.model.layers"


def test_a_group_wider_than_a_layer_is_said_and_wider_than_all_is_refused():
    from modelpress.core import ConfigError

    data = [(torch.randn(4, 64),) for _ in range(2)]
    ctx = Context(options=RunOptions(progress=False))
    q = quantize(_mlp(), GPTQConfig(group_size=96), data=data, ctx=ctx)  # reads 64 and 128 values
    assert any("group_size 96 is larger than the input width of 1 layer(s) (0)" in w for w in ctx.report.warnings)
    assert q[0].weight_q.shape[1] == 1  # one short group per row: one scale per output channel
    with pytest.raises(ConfigError, match=r"group_size 256 .* every layer it quantizes \(the widest reads 128"):
        quantize(_mlp(), GPTQConfig(group_size=256), data=data, ctx=Context(options=RunOptions(progress=False)))
