from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core import BadInputError, ConfigError, Context, DataError, RunOptions
from modelpress.primitives.affine import sqnr_db
from modelpress.quant import (
    DynamicQuantConfig,
    LayerFilter,
    ObserverConfig,
    QConv,
    QLinear,
    StaticQuantConfig,
    WeightOnlyConfig,
    quantize,
)
from modelpress.quant.fold import fold_conv_bn
from modelpress.quant.modules import QEmbedding
from modelpress.zoo import get_entry


@pytest.fixture(scope="module")
def digits(cache_dir):
    entry = get_entry("digits-cnn")
    model = entry.load(cache_dir=cache_dir)
    return entry, model, entry.evaluate(model).value


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def _batches(n: int = 4) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, generator=g),) for _ in range(n)]


def test_conv_bn_folding_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model[1].weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert fold_conv_bn(model) == ["0"]
    assert isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        StaticQuantConfig(),
        StaticQuantConfig(observer=ObserverConfig(kind="mse")),
        StaticQuantConfig(observer=ObserverConfig(kind="percentile")),
        DynamicQuantConfig(),
        WeightOnlyConfig(),
    ],
    ids=["static-minmax", "static-mse", "static-percentile", "dynamic", "w8"],
)
def test_digits_int8_accuracy_drop_within_0_3_points(digits, cfg):
    entry, model, fp32 = digits
    qmodel = quantize(model, cfg, data=entry.calibration_data(256, 32))
    assert fp32 - entry.evaluate(qmodel).value <= 0.003
    layers = [m for m in qmodel.modules() if isinstance(m, (QLinear, QConv))]
    assert len(layers) == 4 and all(m.weight_q.dtype == torch.int8 for m in layers)


def test_quantize_does_not_touch_the_input_model(digits):
    entry, model, _ = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, StaticQuantConfig(), data=entry.calibration_data(64, 32))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, QConv) for m in model.modules())


def test_static_output_close_to_float_and_ranges_from_calibration():
    model = _mlp().eval()
    qmodel = quantize(model, StaticQuantConfig(), data=_batches())
    x = _batches(1)[0][0]
    assert sqnr_db(model(x), qmodel(x)) > 30
    first = qmodel[0]
    lo = min(float(b[0].min()) for b in _batches())
    hi = max(float(b[0].max()) for b in _batches())
    # asymmetric uint8: scale covers the observed range exactly
    torch.testing.assert_close(first.act_scale, torch.tensor((hi - lo) / 255), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bits, floor_db", [(8, 40), (4, 18), (3, 12), (2, 5)])
def test_weight_only_group_sqnr_floor(bits, floor_db):
    model = _mlp().eval()
    cfg = WeightOnlyConfig(bits=bits, granularity="group", group_size=16, symmetric=False)
    qmodel = quantize(model, cfg)
    x = _batches(1)[0][0]
    assert sqnr_db(model(x), qmodel(x)) > floor_db
    assert qmodel[0].weight_scale.shape == (128, 4, 1)  # (out, groups, 1)


def test_layer_filter_and_skipped_layers_are_reported():
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 64), nn.Linear(64, 8)).eval()
    ctx = Context(options=RunOptions(progress=False))
    with pytest.warns(UserWarning, match="skipped 1 Embedding"):
        qmodel = quantize(model, WeightOnlyConfig(layers=LayerFilter(exclude=("^2$",))), ctx=ctx)
    assert isinstance(qmodel[1], QLinear) and isinstance(qmodel[2], nn.Linear)
    assert any("Embedding" in w for w in ctx.report.warnings)
    assert ctx.report.passes[0].stats["layers"] == 1


def test_large_embedding_tables_become_int8_rows():
    from modelpress.quant.modules import QEmbedding

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(2048, 64), nn.Linear(64, 8)).eval()
    small = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 8)).eval()
    ids = torch.randint(0, 2048, (4, 9))
    qmodel = quantize(model, DynamicQuantConfig())
    assert isinstance(qmodel[0], QEmbedding) and qmodel[0].weight_q.dtype == torch.int8
    with torch.inference_mode():
        rows = qmodel[0](ids)
    # one symmetric scale per row: every looked-up value within half a step of the float one
    step = qmodel[0].weight_scale[ids]  # (4, 9, 1)
    assert bool(((rows - model[0](ids).detach()).abs() <= step / 2 + 1e-7).all())
    assert isinstance(quantize(small, DynamicQuantConfig())[0], nn.Embedding)  # 640 values: kept float
    assert isinstance(quantize(model, DynamicQuantConfig(embedding_bits=None))[0], nn.Embedding)
    with pytest.raises(ConfigError, match="embedding_bits must be None \\(float\\) or in \\[2, 8\\], got 12"):
        StaticQuantConfig(embedding_bits=12)


def test_four_bit_embedding_groups_are_packed_two_per_byte():
    from modelpress.quant.modules import QEmbedding

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(2048, 64), nn.Linear(64, 8)).eval()
    ids = torch.randint(0, 2048, (4, 9))
    emb = quantize(model, DynamicQuantConfig(embedding_bits=4, embedding_group_size=16))[0]
    assert isinstance(emb, QEmbedding) and emb.packed
    assert emb.weight_packed.shape == (2048, 32) and emb.weight_packed.dtype == torch.uint8
    assert emb.weight_scale.shape == (2048, 4)
    codes = emb.codes()
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    with torch.inference_mode():
        rows = emb(ids)
    # one scale per group of 16: every value within half of its group's step
    step = emb.weight_scale[ids].repeat_interleave(16, dim=-1)
    assert bool(((rows - model[0](ids).detach()).abs() <= step / 2 + 1e-6).all())
    assert torch.equal(rows, emb.dequantized_weight()[ids])
    with pytest.raises(ConfigError, match="group_size must divide the embedding width 64, got 24"):
        quantize(model, DynamicQuantConfig(embedding_bits=4, embedding_group_size=24))
    with pytest.raises(ConfigError, match="embedding_group_size must be >= 2 and needs embedding_bits"):
        DynamicQuantConfig(embedding_bits=None, embedding_group_size=16)


def test_group_size_that_does_not_divide_gets_a_short_last_group():
    model = nn.Sequential(nn.Linear(48, 32), nn.Linear(32, 8)).eval()
    ctx = Context(options=RunOptions(progress=False))
    qmodel = quantize(model, WeightOnlyConfig(bits=4, granularity="group", group_size=32), ctx=ctx)
    assert isinstance(qmodel[0], QLinear) and isinstance(qmodel[1], QLinear)
    assert qmodel[0].weight_q.shape == (32, 2, 32) and qmodel[0].weight_scale.shape == (32, 2, 1)
    assert not any("skipped" in w for w in ctx.report.warnings)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="bits must be in \\[2, 8\\], got 1"):
        StaticQuantConfig(bits=1)
    with pytest.raises(ConfigError, match="bits must be in \\[2, 8\\], got 17"):
        WeightOnlyConfig.from_dict({"bits": 17})
    with pytest.raises(DataError, match="calibration set is empty"):
        quantize(_mlp(), StaticQuantConfig(), data=[])
    with pytest.raises(DataError, match="needs calibration data"):
        quantize(_mlp(), StaticQuantConfig())
    with pytest.raises(DataError, match="does not fit the model"):
        quantize(_mlp(), StaticQuantConfig(), data=[(torch.randn(4, 3),)])
    with pytest.raises(BadInputError, match="no quantizable layers"):
        quantize(nn.Sequential(nn.ReLU()), DynamicQuantConfig())
    broken = _mlp()
    broken[0].weight.data[0, 0] = float("nan")
    with pytest.raises(BadInputError, match="0.weight has non-finite values"):
        quantize(broken, DynamicQuantConfig())
    with pytest.raises(ConfigError, match="bad layer pattern"):
        LayerFilter(include=("(",))


def test_dynamic_per_token_beats_per_tensor_with_an_outlier_token():
    model = _mlp().eval()
    x = torch.randn(8, 64)
    x[0] *= 50  # one outlier token
    per_token = quantize(model, DynamicQuantConfig(act_granularity="token"))
    per_tensor = quantize(model, DynamicQuantConfig(act_granularity="tensor"))
    ref = model(x)
    assert sqnr_db(ref[1:], per_token(x)[1:]) > sqnr_db(ref[1:], per_tensor(x)[1:]) + 10


def test_layers_targeted_by_type_with_an_ignore_list():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.Linear(16, 4)).eval()
    only_linear = LayerFilter(types=("Linear",), exclude=("^3$",))
    qmodel = quantize(model, WeightOnlyConfig(layers=only_linear))
    assert isinstance(qmodel[0], nn.Conv2d) and isinstance(qmodel[2], QLinear) and isinstance(qmodel[3], nn.Linear)
    assert isinstance(quantize(model, WeightOnlyConfig(layers=LayerFilter(types=("Conv2d",))))[0], QConv)
    with pytest.raises(ConfigError, match="layer types are class names such as 'Linear' or 'Conv2d', got 'nn.Linear'"):
        LayerFilter(types=("nn.Linear",))
    with pytest.raises(BadInputError, match="no quantizable layers selected"):
        quantize(model, WeightOnlyConfig(layers=LayerFilter(types=("LSTM",))))


def test_quantize_embeddings_keeps_a_tied_head_on_the_tables_codes():
    from modelpress.quant.modules import QEmbedding, QLinear, holds_table_codes
    from modelpress.quant.ptq import quantize_embeddings

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(1024, 96)
            self.small = nn.Embedding(8, 96)  # too small to be worth integers: stays float
            self.head = nn.Linear(96, 1024, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids) + self.small(ids % 8))

    torch.manual_seed(0)
    model, ctx = TiedLM(), Context(options=RunOptions(progress=False))
    ids = torch.randint(0, 1024, (2, 16))
    before = model(ids)
    assert quantize_embeddings(model, 8, 32, ctx) == ["embed", "head"]
    assert isinstance(model.embed, QEmbedding) and isinstance(model.head, QLinear)
    assert isinstance(model.small, nn.Embedding)
    assert holds_table_codes(model.head, model.embed)
    torch.testing.assert_close(model.head.dequantized_weight(), model.embed.dequantized_weight())
    assert torch.nn.functional.cosine_similarity(model(ids).flatten(), before.flatten(), dim=0) > 0.999
    untied = TiedLM()
    untied.head.weight = nn.Parameter(untied.embed.weight.detach().clone())  # same values, not shared
    assert quantize_embeddings(untied, 8, 64, ctx) == ["embed"]  # the head is left to the weight pass
    assert untied.embed.group_size == 96 and any("does not divide its width 96" in w for w in ctx.report.warnings)


def test_an_embedding_that_scales_its_lookup_is_kept_float():
    """Gemma's table multiplies its rows by sqrt(hidden) in its own forward: a QEmbedding would drop that, so
    the passes keep it float and say why (GPTQ's calibrated head is then untied from it)."""
    from modelpress.core.layer_filter import LayerFilter
    from modelpress.quant.gptq import GPTQConfig

    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 8.0

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = ScaledEmbedding(1024, 64)
            self.body = nn.Linear(64, 64)
            self.lm_head = nn.Linear(64, 1024, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm_head(torch.tanh(self.body(self.embed(ids))))

    torch.manual_seed(0)
    model = Tied().eval()
    ctx = Context(options=RunOptions(progress=False))
    q = quantize(model, DynamicQuantConfig(), ctx=ctx)
    assert type(q.embed) is ScaledEmbedding
    assert any("embed kept float: ScaledEmbedding changes the lookup" in w for w in ctx.report.warnings)
    ids = torch.randint(0, 1024, (2, 8))
    torch.testing.assert_close(q.embed(ids), model.embed(ids))
    data = [(torch.randint(0, 1024, (2, 16)),) for _ in range(2)]
    ctx = Context(options=RunOptions(progress=False))
    with pytest.warns(UserWarning, match="no repeated block list"):
        g = quantize(model, GPTQConfig(group_size=32, head_bits=4, embedding_group_size=32,
                                       layers=LayerFilter(exclude=("lm_head",))), data=data, ctx=ctx)  # fmt: skip
    assert type(g.embed) is ScaledEmbedding and isinstance(g.lm_head, QLinear)
    assert any("embed kept float, untied from lm_head" in w for w in ctx.report.warnings)
    with pytest.raises(ConfigError, match="ScaledEmbedding changes the lookup"):
        QEmbedding(model.embed)


def test_a_quantized_conv_answers_what_models_read_of_a_conv() -> None:
    from modelpress.quant.modules import QConv

    conv = nn.Conv2d(3, 4, (3, 5), stride=2, padding=1)
    q = quantize(nn.Sequential(conv), WeightOnlyConfig(bits=8))[0]
    assert isinstance(q, QConv)
    assert (q.kernel_size, q.stride, q.padding_mode) == ((3, 5), (2, 2), "zeros")
    assert q.weight.dtype == torch.float32 and q.weight.shape == conv.weight.shape  # ViT reads weight.dtype
    torch.testing.assert_close(q.weight, q.dequantized_weight())
    assert "weight" not in dict(q.named_parameters()) and "weight" not in q.state_dict()


@pytest.mark.parametrize("config", [WeightOnlyConfig(bits=8), DynamicQuantConfig()])
def test_layers_torch_reads_as_tensors_are_skipped_with_the_reason(config) -> None:
    """nn.MultiheadAttention passes `out_proj.weight` to its functional form instead of calling out_proj, and
    nn.TransformerEncoderLayer's fused inference path reads linear1 / linear2 as tensors: an integer layer there
    would never run (and has no float `weight`), so it stays float and the report says why."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    attention = nn.MultiheadAttention(16, 2, batch_first=True)
    model = nn.ModuleDict({"embed": nn.Linear(4, 16), "encoder": encoder, "attention": attention}).eval()

    def forward(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
        h = m["encoder"](m["embed"](x))
        return m["attention"](h, h, h, need_weights=False)[0]

    ctx = Context(options=RunOptions(progress=False))
    with pytest.warns(UserWarning, match=r"skipped encoder\.layers\.0\.self_attn\.out_proj: MultiheadAttention reads"):
        qmodel = quantize(model, config, ctx=ctx)
    block = qmodel["encoder"].layers[0]
    kept = [block.self_attn.out_proj, block.linear1, block.linear2, qmodel["attention"].out_proj]
    assert all(type(m) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear) for m in kept)
    assert isinstance(qmodel["embed"], QLinear)
    warned = " | ".join(ctx.report.warnings)
    assert "skipped attention.out_proj: MultiheadAttention reads out_proj.weight directly" in warned
    assert "skipped encoder.layers.0.linear2: TransformerEncoderLayer's fused inference path reads" in warned
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        assert sqnr_db(forward(x, model), forward(x, qmodel)) > 20


@pytest.mark.parametrize("config", [WeightOnlyConfig(bits=8), DynamicQuantConfig(), StaticQuantConfig()])
def test_gpt2_conv1d_layers_are_quantized_as_the_linear_they_are(config) -> None:
    """transformers' Conv1D (GPT-2's projections: y = x @ W + b, W stored (in, out)) becomes the equal Linear
    and is quantized like one, instead of being passed over."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(32, 64), nn.GELU(), Conv1D(64, 32)).eval()  # Conv1D(nf=out, nx=in)
    qmodel = quantize(model, config, data=_batches())
    assert isinstance(qmodel[0], QLinear) and isinstance(qmodel[2], QLinear)
    assert type(model[0]) is Conv1D  # the input model is untouched
    x = _batches(1)[0][0]
    with torch.no_grad():
        assert sqnr_db(model(x), qmodel(x)) > 25
