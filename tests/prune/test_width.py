"""Width pruning of transformer blocks: heads and FFN neurons scored on calibration activations, a user's own
attention layer tried before it is cut, nn.MultiheadAttention's heads kept with the reason, the config synced."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelpress.core import BadInputError, ConfigError, Context, RunOptions
from modelpress.primitives.transformer_blocks import find_ffns, find_heads
from modelpress.primitives.width import activation_scores, narrow_transformer, sync_config
from modelpress.prune import StructuredPruneConfig, prune

transformers = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _ids(n: int = 2) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 128, (2, 12), generator=g),) for _ in range(n)]


def _ctx() -> Context:
    return Context(options=RunOptions(progress=False))


def test_activation_scores_are_zero_for_units_that_write_nothing():
    model = _llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5].zero_()
        model.model.layers[0].self_attn.o_proj.weight[:, 16:].zero_()  # query heads 2, 3: K/V group 1
    heads, ffns = find_heads(model), find_ffns(model)
    head_scores, ffn_scores = activation_scores(model, heads, ffns, _ids())
    assert head_scores[0].shape == (2,) and head_scores[0][1] == 0 and head_scores[0][0] > 0
    assert ffn_scores[0].shape == (64,) and ffn_scores[0][5] == 0 and (ffn_scores[0] > 0).sum() == 63


def test_activation_importance_cuts_the_quiet_units_and_keeps_the_config_true(tmp_path):
    model = _llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :32].zero_()
            layer.self_attn.o_proj.weight[:, :16].zero_()
    x = _ids(1)[0][0]
    ref = model(x).logits
    cfg = StructuredPruneConfig(heads_ratio=0.5, ffn_ratio=0.5, importance="activation")
    ctx = _ctx()
    out = prune(model, cfg, data=_ids(), ctx=ctx)
    torch.testing.assert_close(out(x).logits, ref, atol=1e-4, rtol=1e-4)  # only silent units were cut
    stats = ctx.report.passes[-1].stats
    assert stats["heads"]["model.layers.0.self_attn"] == "4->2" and stats["ffn"]["model.layers.1.mlp"] == "64->32"
    assert stats["config"] == {"num_attention_heads": 2, "head_dim": 8, "num_key_value_heads": 1,
                               "intermediate_size": 32}  # fmt: skip
    out.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(x).logits, out(x).logits)


def test_activation_importance_is_refused_where_it_cannot_score():
    with pytest.raises(ConfigError, match="importance 'activation' scores attention heads and FFN neurons"):
        StructuredPruneConfig(channel_ratio=0.5, importance="activation")
    with pytest.raises(BadInputError, match="importance 'activation' .* calibration data: pass --data"):
        prune(_llama(), StructuredPruneConfig(ffn_ratio=0.5, importance="activation"), ctx=_ctx())


def test_sync_config_leaves_layers_that_differ():
    model = _llama()
    narrow_transformer(model, 1.0, 0.5, _ids())
    with torch.no_grad():
        find_ffns(model)[0].cut(torch.arange(8))
    assert "differ in their widths: [8, 32]" in sync_config(model)["not_written"]


class _Heads(nn.Module):
    """A user's attention: q / k / v / out and a head count; `split` reads the width it is given (or the input's)."""

    def __init__(self, dim: int = 32, heads: int = 4, from_input: bool = False) -> None:
        super().__init__()
        self.heads, self.from_input = heads, from_input
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            width = d if self.from_input else y.shape[-1]
            return y.view(b, t, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v  # (B, heads, T, head_dim)
        return self.out(a.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("from_input", [False, True])
def test_a_users_attention_is_cut_when_its_forward_allows_it(from_input):
    torch.manual_seed(0)
    model = nn.Sequential(_Heads(from_input=from_input), nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)))
    x = torch.randn(2, 5, 32)
    ctx = _ctx()
    out = prune(model.eval(), StructuredPruneConfig(heads_ratio=0.5, ffn_ratio=0.5), example_inputs=(x,), ctx=ctx)
    assert out[1][0].out_features == 32 and out[1][2].in_features == 32  # the MLP, found as an FFN
    assert out(x).shape == (2, 5, 32)
    if from_input:  # view(b, t, heads, d // heads) with d the input's width: fewer heads cannot run
        assert out[0].heads == 4 and out[0].q.out_features == 32
        assert any("kept the heads of 0: _Heads's forward no longer runs with fewer heads" in w
                   for w in ctx.report.warnings)  # fmt: skip
    else:
        assert out[0].heads == 2 and out[0].q.out_features == 16 and out[0].out.in_features == 16


def test_multihead_attention_keeps_its_heads_and_the_encoder_ffn_is_cut():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 32)
    ctx = _ctx()
    out = prune(model, StructuredPruneConfig(heads_ratio=0.5, ffn_ratio=0.5), example_inputs=(x,), ctx=ctx)
    assert [m.linear1.out_features for m in out.layers] == [32, 32]
    assert out(x).shape == x.shape
    assert any("nn.MultiheadAttention requires num_heads x head_dim == embed_dim" in w for w in ctx.report.warnings)


def test_a_model_without_known_blocks_is_refused_naming_the_layouts():
    with pytest.raises(BadInputError, match=r"heads_ratio=0.5 but Sequential has no recognized attention .* nor FFN"):
        prune(nn.Sequential(nn.Linear(4, 4)), StructuredPruneConfig(heads_ratio=0.5), ctx=_ctx())


def test_on_tiny_lm_activation_importance_loses_less_than_magnitude(tiny_lm):
    """The trained tiny-lm, a third of its heads and half of its FFN neurons cut: scored on calibration text,
    the held-out perplexity rises less than with weight magnitude."""
    from modelpress.zoo.tinylm import SMALL_SPEC, TinyLMEntry, perplexity

    model, base = tiny_lm
    data = TinyLMEntry(SMALL_SPEC).calibration_data(16, 8)
    common = {"heads_ratio": 0.5, "ffn_ratio": 0.5}
    magnitude = perplexity(prune(model, StructuredPruneConfig(**common), ctx=_ctx())) - base
    activation = perplexity(prune(model, StructuredPruneConfig(**common, importance="activation"), data=data)) - base
    assert magnitude > 0 and activation < 0.8 * magnitude, (activation, magnitude, base)
