"""SmoothQuant: the float function is unchanged, outliers move into the weights, static int8 gets better."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from modelpress.core import ConfigError, Context, RunOptions
from modelpress.core.errors import DataError
from modelpress.primitives.affine import sqnr_db
from modelpress.quant import StaticQuantConfig, quantize
from modelpress.quant.smoothquant import SmoothQuantConfig, find_groups, smoothing_scales


class HiddenStates(nn.Module):
    """A transformers model called on (input_ids, attention_mask), returning its last hidden states."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


def tiny(kind: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": 100, "num_attention_heads": 4}
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, **common)
        model: nn.Module = tf.BertModel(cfg, add_pooling_layer=False)
    elif kind == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_key_value_heads=2, **common)
        model = tf.LlamaModel(cfg)
    else:
        model = tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    with torch.no_grad():  # non-trivial norms, so that folding into them is really exercised
        for m in model.modules():
            if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
    return HiddenStates(model).eval()


def batches(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (3, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        out.append((ids, mask))
    return out


def run(model: nn.Module, data: list) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(*b).flatten(0, 1) for b in data])


@pytest.mark.parametrize(("kind", "groups"), [("bert", 4), ("llama", 4), ("gpt2", 4)])
def test_smoothing_keeps_the_float_function(kind: str, groups: int) -> None:
    model = tiny(kind)
    assert len(find_groups(model)) == groups
    ctx = Context(options=RunOptions(progress=False))
    smoothed = quantize(model, SmoothQuantConfig(alpha=0.5), data=batches(), ctx=ctx)
    # power-of-two scales: the rescaling is exact up to float rounding of the reordered products
    torch.testing.assert_close(run(smoothed, batches(seed=1)), run(model, batches(seed=1)), atol=2e-5, rtol=1e-4)
    norms = [n for n, m in model.named_modules() if "Norm" in type(m).__name__ and hasattr(m, "weight")]
    changed = [n for n in norms if not torch.equal(model.get_submodule(n).weight, smoothed.get_submodule(n).weight)]
    assert len(changed) == groups
    (record,) = [p for p in ctx.report.passes if p.name == "quantize/smoothquant"]
    assert record.stats["groups"] == groups


def test_outlier_channels_move_into_the_weights_and_static_int8_improves() -> None:
    model = tiny("bert")
    with torch.no_grad():  # a few outlier channels, as real encoders have after their LayerNorms
        for ln in (model.model.embeddings.LayerNorm, model.model.encoder.layer[0].output.LayerNorm):
            ln.weight[[3, 17]] = 40.0
    data, held_out = batches(8), batches(4, seed=5)
    reference = run(model, held_out)
    static = StaticQuantConfig(per_channel=True)
    plain = quantize(model, static, data=data, ctx=Context(options=RunOptions(progress=False)))
    ctx = Context(options=RunOptions(progress=False))
    smoothed = quantize(quantize(model, SmoothQuantConfig(), data=data, ctx=ctx), static, data=data)

    def snr(m: nn.Module) -> float:
        return sqnr_db(reference, run(m, held_out))

    assert snr(smoothed) > snr(plain) + 3, (snr(smoothed), snr(plain))
    reduction = ctx.report.passes[0].stats["outlier_ratio_reduction"]
    assert reduction["model.embeddings.LayerNorm"] > 4


def test_scales_follow_the_formula() -> None:
    a, w = torch.tensor([16.0, 1.0, 0.25]), torch.tensor([1.0, 4.0, 1.0])
    torch.testing.assert_close(smoothing_scales(a, w, 0.5, power_of_two=False), torch.tensor([4.0, 0.5, 0.5]))
    assert torch.equal(smoothing_scales(a * 1.3, w, 0.5), torch.tensor([4.0, 0.5, 0.5]))  # rounded to 2^k
    torch.testing.assert_close(smoothing_scales(a, w, 1.0, power_of_two=False), a)


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\], got 1.5"):
        SmoothQuantConfig(alpha=1.5)
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="no normalization"):  # nothing to smooth: left as it is
        same = quantize(mlp, SmoothQuantConfig(), data=[(torch.randn(2, 4),)])
    assert all(torch.equal(a, b) for a, b in zip(mlp.state_dict().values(), same.state_dict().values(), strict=True))
    with pytest.raises(DataError, match="needs calibration data"):
        quantize(tiny("bert"), SmoothQuantConfig())
    with pytest.raises(DataError, match="calibration set is empty"):
        quantize(tiny("bert"), SmoothQuantConfig(), data=[])


def _decoder(kind: str) -> nn.Module:
    """A tiny random transformers decoder returning its logits, norms made non-trivial."""
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    if kind == "gemma3":  # RMSNorm computes x * (1 + w); sandwich norms around each sub-block
        config = tf.Gemma3TextConfig(intermediate_size=64, num_key_value_heads=2, head_dim=8, **common)
        lm = tf.Gemma3ForCausalLM(config)
    elif kind == "phi":  # attention and MLP read one LayerNorm in parallel
        lm = tf.PhiForCausalLM(tf.PhiConfig(intermediate_size=64, **common))
    else:  # OPT with its LayerNorms after each sub-block (post-LN): nothing can be folded
        lm = tf.OPTForCausalLM(tf.OPTConfig(ffn_dim=64, do_layer_norm_before=False, word_embed_proj_dim=32, **common))
    with torch.no_grad():
        for m in lm.modules():
            if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=ids, attention_mask=mask).logits

    return Logits().eval()


_QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


@pytest.mark.parametrize(
    ("kind", "scaled"),
    [
        ("gemma3", [*_QKV, "mlp.gate_proj", "mlp.up_proj"]),  # the MLP reads pre_feedforward_layernorm
        ("phi", [*_QKV, "mlp.fc1"]),  # one norm, read by attention and MLP
        ("opt-post-ln", []),
    ],
)
def test_other_decoder_layouts_keep_the_float_function(kind: str, scaled: list[str]) -> None:
    from modelpress.quant.smoothquant import norm_offset

    model = _decoder(kind)
    ctx = Context(options=RunOptions(progress=False))
    with pytest.warns(UserWarning) if not scaled else contextlib.nullcontext() as caught:
        smoothed = quantize(model, SmoothQuantConfig(alpha=0.5), data=batches(), ctx=ctx)
    torch.testing.assert_close(run(smoothed, batches(seed=1)), run(model, batches(seed=1)), atol=2e-5, rtol=1e-4)
    (record,) = [p for p in ctx.report.passes if p.name == "quantize/smoothquant"]
    prefix = "lm.model.decoder.layers.0." if kind.startswith("opt") else "lm.model.layers.0."
    assert [n.removeprefix(prefix) for n in record.stats["layers"] if n.startswith(prefix)] == scaled
    if not scaled:  # each fold changed the output: undone, and said so
        assert any("changes the model's output" in str(w.message) for w in caught)
    if kind == "gemma3":  # x * (1 + w): the fold divides 1 + w
        assert norm_offset(model.lm.model.layers[0].input_layernorm) == 1.0
        assert norm_offset(nn.LayerNorm(8)) == 0.0
