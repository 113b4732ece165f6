"""Group sizes that do not divide a layer's width: a short last group with its own scale, never float.

The widths of the tiny Llama are those of real LLMs in miniature: hidden 96 and intermediate 160 with
group 64 leave tails of 32 (64 + 32 and 64 + 64 + 32 columns), as SmolLM2's 576 does with group 128.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from modelpress.core import Context, RunOptions, numerics
from modelpress.export.onnx import check_parity, export_onnx
from modelpress.export.onnx_nbits import export_nbits_onnx
from modelpress.measure.size import count_params
from modelpress.primitives.affine import (
    QuantScheme,
    dequantize_tensor,
    group_view,
    n_groups,
    qparams_from_range,
    quantize_tensor,
)
from modelpress.primitives.gptq import gptq_quantize, hessian_update
from modelpress.primitives.packing import packed_size
from modelpress.quant import QLinear, WeightOnlyConfig, quantize
from modelpress.quant import awq as awq_module
from modelpress.quant.awq import AWQConfig
from modelpress.quant.gptq import GPTQConfig
from modelpress.quant.packed import load_packed, save_packed
from modelpress.quant.sensitivity import _layer_names

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, GROUP = 128, 64


class Logits(nn.Module):
    """A tiny random Llama (hidden 96, intermediate 160) returning its logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        self.lm = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _calibration() -> list[tuple[torch.Tensor]]:
    return [(_ids(2, 16, seed),) for seed in range(4)]


def _skipped_layers(ctx: Context) -> list[str]:
    return [w for w in ctx.report.warnings if w.startswith("skipped lm.")]  # "skipped NAME: why (kept in float)"


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def float_model() -> nn.Module:
    return Logits().eval()


@pytest.fixture(scope="module")
def rtn(float_model) -> tuple[nn.Module, Context]:
    ctx = Context(options=RunOptions(progress=False))
    cfg = WeightOnlyConfig(bits=4, symmetric=False, granularity="group", group_size=GROUP)
    return quantize(float_model, cfg, ctx=ctx), ctx


@pytest.fixture(scope="module")
def gptq(float_model) -> tuple[nn.Module, Context]:
    ctx = Context(options=RunOptions(progress=False))
    return quantize(float_model, GPTQConfig(bits=4, group_size=GROUP), data=_calibration(), ctx=ctx), ctx


@pytest.fixture(scope="module")
def awq(float_model) -> tuple[nn.Module, Context, dict[str, torch.Tensor]]:
    """AWQ's model, and the float (scaled) weight each QLinear was rounded from."""
    weights: dict[int, torch.Tensor] = {}

    class Recording(QLinear):
        def __init__(self, weight: torch.Tensor, *args, **kwargs) -> None:
            super().__init__(weight, *args, **kwargs)
            weights[id(self)] = weight.detach().float().clone()

    ctx = Context(options=RunOptions(progress=False))
    mp = pytest.MonkeyPatch()
    mp.setattr(awq_module, "QLinear", Recording)
    try:
        q = quantize(float_model, AWQConfig(bits=4, group_size=GROUP), data=_calibration(), ctx=ctx)
    finally:
        mp.undo()
    return q, ctx, {n: weights[id(m)] for n, m in q.named_modules() if isinstance(m, QLinear)}


def _check_layer(layer: QLinear, weight: torch.Tensor, exact: bool) -> None:
    """Group by group, the tail included: codes in range, padding at the zero point, error within the bound.

    `exact`: the codes round `weight` itself (RTN, AWQ), so each value is within half a step of its group's
    grid (or clamped to the grid's end, for a clipped range). Otherwise (GPTQ, which rounds the weight as
    updated by the error of the columns before) each group's relative error stays small, the short
    group's no larger than the full groups'.
    """
    scheme = layer.weight_scheme
    n, k = weight.shape
    groups = n_groups(k, scheme.group_size)
    assert layer.weight_q.shape == (n, groups, scheme.group_size) and layer.weight_scale.shape == (n, groups, 1)
    q, scale, zp = layer.weight_q.int(), layer.weight_scale, layer.weight_zero_point
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    padding = q.reshape(n, -1)[:, k:]
    assert torch.equal(padding, zp.reshape(n, groups)[:, -1:].expand_as(padding))  # dequantizes to 0
    w_hat = layer.dequantized_weight()
    assert w_hat.shape == (n, k)
    wv, hv = group_view(weight, scheme), group_view(w_hat, scheme)  # (N, G, gs), the tail padded with zeros
    if exact:
        lo, hi = (scheme.qmin - zp) * scale, (scheme.qmax - zp) * scale  # (N, G, 1): the grid's ends
        outside = (wv - hi).clamp(min=0) + (lo - wv).clamp(min=0)
        assert bool(((wv - hv).abs() <= scale / 2 + outside + 1e-6).all())
    else:
        rel = (wv - hv).norm(dim=-1) / wv.norm(dim=-1)  # (N, G)
        assert float(rel.max()) < 0.35 and float(rel[:, -1].mean()) < 1.25 * float(rel[:, :-1].mean())
    tail = slice((groups - 1) * scheme.group_size, k)
    assert (w_hat[:, tail] != 0).any()  # the short group holds real values


# ---------------------------------------------------------------- primitives


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("width", "group"), [(80, 32), (40, 64), (64, 64)])
def test_a_short_last_group_has_its_own_scale(symmetric, width, group):
    torch.manual_seed(0)
    w = torch.randn(6, width)
    w[:, (width // group) * group :] *= 10  # a tail of other magnitude: a shared scale would show
    scheme = QuantScheme(4, symmetric, "group", 0, group)
    qt = quantize_tensor(w, scheme)
    groups = n_groups(width, group)
    assert qt.q.shape == (6, groups, group) and qt.scale.shape == (6, groups, 1)
    for g in range(groups):
        cols = w[:, g * group : (g + 1) * group]  # the last slice is short
        scale, zp = qparams_from_range(cols.amin(1, keepdim=True), cols.amax(1, keepdim=True), scheme)
        torch.testing.assert_close(qt.scale[:, g], scale, rtol=0, atol=0)
        assert torch.equal(qt.zero_point[:, g], zp)
    w_hat = dequantize_tensor(qt)
    assert w_hat.shape == w.shape
    step = qt.scale.expand(-1, -1, group).reshape(6, -1)[:, :width]
    assert bool(((w - w_hat).abs() <= step / 2 + 1e-6).all())


def test_a_group_wider_than_the_row_is_one_group_per_row():
    torch.manual_seed(0)
    w = torch.randn(5, 40)
    per_group = quantize_tensor(w, QuantScheme(4, False, "group", 0, 128))
    per_row = quantize_tensor(w, QuantScheme(4, False, "channel", 0))
    assert per_group.q.shape == (5, 1, 128)
    torch.testing.assert_close(per_group.scale.reshape(5), per_row.scale.reshape(5), rtol=0, atol=0)
    torch.testing.assert_close(dequantize_tensor(per_group), dequantize_tensor(per_row), rtol=0, atol=0)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize(("width", "group"), [(80, 32), (40, 64)])
def test_gptq_with_identity_hessian_is_round_to_nearest_on_ragged_groups(act_order, width, group):
    torch.manual_seed(0)
    w = torch.randn(8, width)
    scheme = QuantScheme(4, False, "group", 0, group)
    res = gptq_quantize(w, torch.eye(width), scheme, act_order=act_order, block_size=16)
    rtn = quantize_tensor(w, scheme)
    assert torch.equal(res.q, rtn.q) and torch.equal(res.zero_point, rtn.zero_point)
    torch.testing.assert_close(res.scale, rtn.scale, rtol=0, atol=0)


def test_gptq_act_order_groups_follow_the_original_columns():
    torch.manual_seed(0)
    w = torch.randn(8, 80)
    x = torch.randn(256, 80) * torch.linspace(0.1, 3.0, 80)  # act order visits the tail's columns first
    h, _ = hessian_update(None, 0, x)
    scheme = QuantScheme(4, False, "group", 0, 32)
    res = gptq_quantize(w, h, scheme, act_order=True, block_size=16)
    assert res.perm is not None and int(res.perm[0]) >= 64
    for g, cols in enumerate((slice(0, 32), slice(32, 64), slice(64, 80))):  # static groups: the original weight's
        scale, zp = qparams_from_range(w[:, cols].amin(1, keepdim=True), w[:, cols].amax(1, keepdim=True), scheme)
        torch.testing.assert_close(res.scale[:, g], scale, rtol=0, atol=0)
        assert torch.equal(res.zero_point[:, g], zp)
    assert torch.equal(res.q.reshape(8, -1)[:, 80:].int(), res.zero_point[:, 2].expand(8, 16))


# ---------------------------------------------------------------- passes on a tiny Llama


def test_round_to_nearest_quantizes_every_layer_within_the_bound(float_model, rtn):
    q, ctx = rtn
    floats = _linears(float_model)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QLinear)}
    assert set(layers) == set(floats) and not _skipped_layers(ctx)
    assert {layers[n].in_features for n in layers} == {96, 160}
    for name, layer in layers.items():
        _check_layer(layer, floats[name].weight.detach(), exact=True)


def test_gptq_quantizes_every_layer_within_the_bound(float_model, gptq):
    q, ctx = gptq
    assert GPTQConfig().act_order
    floats = _linears(float_model)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QLinear)}
    assert set(layers) == set(floats) - {"lm.lm_head"} and not _skipped_layers(ctx)
    for name, layer in layers.items():
        _check_layer(layer, floats[name].weight.detach(), exact=False)


def test_awq_quantizes_every_layer_within_the_bound(float_model, awq):
    q, ctx, weights = awq
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QLinear)}
    assert set(layers) == set(_linears(float_model)) - {"lm.lm_head"}
    assert not _skipped_layers(ctx)
    for name, layer in layers.items():
        _check_layer(layer, weights[name], exact=True)


def test_the_recipes_keep_gptq_activation_order():
    from modelpress.recipes.recipe import load_recipe

    (cfg,) = load_recipe("w4-gptq").passes
    assert isinstance(cfg, GPTQConfig) and cfg.act_order


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_onnx_export_computes_what_the_eager_model_computes(tmp_path, method, request):
    q = request.getfixturevalue(method)[0]
    ids = _ids(2, 12, 10)
    path = export_onnx(q, (ids,), tmp_path / "lm.onnx")
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == sum(isinstance(m, QLinear) for m in q.modules())
    parity = check_parity(q, path, (_ids(3, 12, 11),))  # another batch size
    assert parity["mean_cosine"] > 0.999 and parity["max_abs"] < 1e-3


@pytest.mark.parametrize("group", [48, 256])  # not a power of two: dequantized at load; wider than every layer
def test_onnx_export_of_other_group_sizes(tmp_path, float_model, group):
    q = quantize(float_model, WeightOnlyConfig(bits=4, symmetric=False, granularity="group", group_size=group))
    ids = _ids(2, 12, 10)
    path = export_nbits_onnx(q, (ids,), tmp_path / "lm.onnx", embeddings="float")
    parity = check_parity(q, path, (_ids(3, 12, 11),))
    assert parity["mean_cosine"] > 0.999 and parity["max_abs"] < 1e-3


def test_packed_file_stores_no_padding_and_loads_the_same_codes(tmp_path, float_model, rtn):
    q = rtn[0]
    path = save_packed(q, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        down = f.get_tensor("lm.model.layers.0.mlp.down_proj.weight_q")
    assert down.numel() == packed_size(96 * 160, 4)  # not 96 * 192
    import copy

    loaded = load_packed(copy.deepcopy(float_model), path)
    ids = _ids(2, 12, 10)
    for name, layer in q.named_modules():
        if isinstance(layer, QLinear):
            assert torch.equal(loaded.get_submodule(name).weight_q, layer.weight_q)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), q(ids), rtol=0, atol=0)


def test_padding_is_not_counted_as_parameters(float_model, rtn):
    assert count_params(rtn[0])[0] == count_params(float_model)[0]


def test_torch_export_runs_the_ragged_layer():
    from modelpress.export.inductor import export_program

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 40)).eval()
    q = quantize(model, WeightOnlyConfig(bits=4, symmetric=False, granularity="group", group_size=GROUP))
    x = torch.randn(3, 7, 96)
    program = export_program(q, (x,), bf16=False, dynamic_seq=False)
    with torch.no_grad(), numerics.exact():  # the traced program runs the float reference
        torch.testing.assert_close(program.module()(x), q(x))


def test_sensitivity_considers_every_linear(float_model):
    cfg = WeightOnlyConfig(bits=4, granularity="group", group_size=GROUP)
    assert set(_layer_names(float_model, cfg)) == set(_linears(float_model))
