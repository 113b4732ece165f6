"""AWQ: the scale and clipping searches, exact folding, and quality against round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modelpress.core import ConfigError, Context, RunOptions
from modelpress.primitives.affine import QuantScheme
from modelpress.primitives.awq import activation_magnitude, fake_quant_weight, search_clip, search_scale
from modelpress.quant import LayerFilter, QLinear, WeightOnlyConfig, quantize
from modelpress.quant.awq import AWQConfig, _fold
from modelpress.zoo.tinylm import SMALL_SPEC, TinyLMEntry, perplexity

NO_HEAD = LayerFilter(exclude=(r"lm_head$",))
RTN3 = WeightOnlyConfig(bits=3, symmetric=False, granularity="group", group_size=128, layers=NO_HEAD)


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(t: int, k: int, outliers: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :outliers] *= 25  # a few channels with large activations, as in LLM hidden states
    return x


def _mse(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ (w - w_hat).t()).pow(2).mean())


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    bits=st.sampled_from([2, 3, 4]),
    symmetric=st.booleans(),
    outliers=st.integers(0, 4),
)
def test_scale_search_is_never_worse_than_round_to_nearest(seed, bits, symmetric, outliers):
    x = _inputs(256, 64, outliers, seed)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(seed + 1))
    scheme = QuantScheme(bits, symmetric, "group", group_size=32)
    res = search_scale(w, x, scheme, n_grid=8)
    rtn = _mse(x, w, fake_quant_weight(w, scheme))
    assert res.rtn_error == pytest.approx(rtn, rel=1e-5)
    assert res.error <= rtn * (1 + 1e-6)
    w_hat = fake_quant_weight(w * res.scale, scheme) / res.scale
    assert _mse(x, w, w_hat) == pytest.approx(res.error, rel=1e-4)


def test_scale_search_protects_outlier_channels():
    x, w = _inputs(512, 128, 4, 0), torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    res = search_scale(w, x, QuantScheme(3, False, "group", group_size=64), activation_magnitude(x))
    assert res.alpha > 0 and res.error < 0.9 * res.rtn_error
    assert bool((res.scale[:4] > res.scale[4:].max()).all())  # the outlier inputs get the largest scales


def test_clip_search_lowers_group_output_error():
    x, w = _inputs(512, 64, 0, 2), torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    w[:, 0] *= 8  # one large weight per row makes the plain range wasteful
    scheme = QuantScheme(3, False, "group", group_size=32)
    lo, hi = search_clip(w, x, scheme)
    assert lo.shape == (32, 2, 1)
    assert _mse(x, w, fake_quant_weight(w, scheme, lo, hi)) < _mse(x, w, fake_quant_weight(w, scheme))


@pytest.mark.parametrize("producer_kind", ["layernorm", "linear"])
def test_fold_keeps_the_float_function(producer_kind):
    torch.manual_seed(0)
    producer = nn.LayerNorm(32) if producer_kind == "layernorm" else nn.Linear(16, 32)
    if producer_kind == "layernorm":
        nn.init.normal_(producer.weight)
        nn.init.normal_(producer.bias)
    consumers = [nn.Linear(32, 8), nn.Linear(32, 4)]
    x = torch.randn(10, 32 if producer_kind == "layernorm" else 16)
    with torch.no_grad():
        before = [c(producer(x)) for c in consumers]
        assert _fold(producer, consumers, torch.rand(32) * 4 + 0.1)
        after = [c(producer(x)) for c in consumers]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not _fold(nn.Linear(4, 5), consumers, torch.ones(32))  # shapes do not fit: refused


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="n_grid must be >= 1, got 0"):
        AWQConfig(n_grid=0)
    with pytest.raises(ConfigError, match="max_shrink must be in"):
        AWQConfig(max_shrink=1.0)
    with pytest.raises(ConfigError, match="bits must be in"):
        AWQConfig(bits=12)


def test_post_norm_encoder_scales_only_foldable_layers():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 100, (4, 16), generator=g),) for _ in range(4)]
    ctx = Context(options=RunOptions(progress=False))
    q = quantize(model, AWQConfig(bits=4, group_size=32, n_grid=5), data=data, ctx=ctx)
    (record,) = [p for p in ctx.report.passes if p.name == "quantize/awq"]
    assert set(record.stats["alpha"]) == {f"encoder.layer.{i}.attention.output.dense" for i in range(2)}
    assert "encoder.layer.0.attention.self.query" in record.stats["unscaled"]
    assert any("no foldable op in front of 10 layer(s)" in w for w in ctx.report.warnings)
    assert sum(isinstance(m, QLinear) for m in q.modules()) == 12
    with torch.no_grad():
        cos = torch.cosine_similarity(q(data[0][0])[0], model(data[0][0])[0], dim=-1)
    assert float(cos.mean()) > 0.98


def test_awq_on_tiny_lm_beats_round_to_nearest(tiny_lm):
    model, base = tiny_lm
    data = TinyLMEntry(SMALL_SPEC).calibration_data(32, 8)
    ctx = Context(options=RunOptions(progress=False))
    aq = quantize(model, AWQConfig(bits=3, group_size=128, n_grid=10, max_tokens=1024), data=data, ctx=ctx)
    rtn = quantize(model, RTN3)
    assert perplexity(aq) < perplexity(rtn)
    (record,) = [p for p in ctx.report.passes if p.name == "quantize/awq"]
    assert record.stats["unscaled"] == []  # every Llama Linear has a foldable producer
    assert all(r <= 1.0 + 1e-6 for r in record.stats["mse_vs_rtn"].values())


@pytest.mark.parametrize(
    ("kind", "unscaled"),
    [
        ("gemma3", {"self_attn.o_proj"}),  # grouped-query v_proj: fewer rows than o_proj reads
        ("phi", {"mlp.fc2"}),  # q/k/v and fc1 read one norm in parallel; fc2 reads a GELU
        ("opt", {"fc2"}),  # fc2 reads a ReLU
    ],
)
def test_other_decoder_layouts_fold_into_their_norms(kind, unscaled):
    """Gemma's x * (1 + w) norms, its sandwich norms, Phi's parallel block and OPT's layer names all fold."""
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    if kind == "gemma3":
        config = tf.Gemma3TextConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common)
        lm: nn.Module = tf.Gemma3ForCausalLM(config)
    elif kind == "phi":
        lm = tf.PhiForCausalLM(tf.PhiConfig(intermediate_size=128, **common))
    else:
        lm = tf.OPTForCausalLM(tf.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common))
    lm.eval()
    with torch.no_grad():
        for m in lm.modules():
            if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 100, (4, 16), generator=g),) for _ in range(4)]
    ctx = Context(options=RunOptions(progress=False))
    cfg = AWQConfig(bits=4, group_size=32, n_grid=5, layers=NO_HEAD)
    q = quantize(lm, cfg, data=data, ctx=ctx)
    (record,) = [p for p in ctx.report.passes if p.name == "quantize/awq"]
    assert {n.split(".layers.0.")[1] for n in record.stats["unscaled"] if ".layers.0." in n} == unscaled
    assert not any("changes the output" in w for w in ctx.report.warnings)
    assert all(r <= 1.0 + 1e-6 for r in record.stats["mse_vs_rtn"].values())  # each scaled layer: <= RTN's error
    rtn = quantize(lm, WeightOnlyConfig(bits=4, symmetric=False, granularity="group", group_size=32, layers=NO_HEAD))
    ids = torch.randint(0, 100, (2, 16), generator=g)
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
        ours, plain = (float(torch.cosine_similarity(m(input_ids=ids).logits, ref, dim=-1).mean()) for m in (q, rtn))
    assert ours > plain - 0.002, (ours, plain)  # a broken fold would cost far more (random weights: AWQ ~ RTN)
