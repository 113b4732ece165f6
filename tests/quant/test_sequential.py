"""Sequential calibration: finding blocks, capturing their inputs, feeding quantized outputs forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core import Context, DataError, RunOptions
from modelpress.core.modules import set_submodule
from modelpress.primitives.affine import QuantScheme
from modelpress.primitives.sequential import (
    Scope,
    capture_block_inputs,
    convert_conv1d,
    find_blocks,
    first_tensor,
    run_sequential,
)
from modelpress.quant import LayerFilter, QLinear, WeightOnlyConfig, quantize
from modelpress.quant.gptq import GPTQConfig
from modelpress.zoo.tinylm import SMALL_SPEC, TinyLMEntry, perplexity

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    ).eval()


def _ids(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (2, 16), generator=g),) for _ in range(n)]


def test_find_blocks_in_decoder_encoder_and_gpt2():
    from transformers import BertConfig, BertModel

    assert find_blocks(_llama())[0] == "model.layers"
    assert find_blocks(_gpt2())[0] == "transformer.h"
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64))  # fmt: skip
    assert find_blocks(bert)[0] == "encoder.layer"
    assert find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) is None


def test_conv1d_becomes_an_equal_linear():
    model, (batch,) = _gpt2(), _ids(1)
    with torch.no_grad():
        before = model(*batch).logits
        names = convert_conv1d(model)
        after = model(*batch).logits
    assert "transformer.h.0.attn.c_attn" in names and len(names) == 8
    assert isinstance(model.transformer.h[0].mlp.c_fc, nn.Linear)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_captured_inputs_are_the_first_blocks_inputs():
    model, batches = _llama(), _ids(2)
    calls = capture_block_inputs(model, model.model.layers[0], batches)
    assert len(calls) == 2
    torch.testing.assert_close(calls[1].args[0], model.model.embed_tokens(batches[1][0]))
    assert "position_embeddings" in calls[0].kwargs
    with torch.no_grad():  # the recorded call reproduces the block's output inside the full model
        seen = []
        h = model.model.layers[0].register_forward_hook(lambda _m, _a, out: seen.append(first_tensor(out)))
        model(*batches[0])
        h.remove()
        torch.testing.assert_close(first_tensor(model.model.layers[0](*calls[0].args, **calls[0].kwargs)), seen[0])


def test_each_block_sees_the_quantized_outputs_of_the_blocks_before():
    model, batches = _llama(), _ids(2)
    selected = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    scheme = QuantScheme(2, False, "group", group_size=16)  # coarse, so float and quantized inputs differ
    seen: dict[str, torch.Tensor] = {}

    def rtn_block(scope: Scope) -> None:
        seen[scope.name] = scope.forward()[0]
        for name, layer in scope.layers.items():
            set_submodule(model, name, QLinear.from_float(layer, scheme))

    stats = run_sequential(model, batches, selected, rtn_block, Context(options=RunOptions(progress=False)), "test")
    assert stats["blocks"] == 3 and "outside_blocks" not in stats
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: outputs.append(first_tensor(out))) for b in model.model.layers]
    with torch.no_grad():
        model(*batches[0])
    for h in hooks:
        h.remove()
    # Block 1's scope ran its float self on the output of the *quantized* block 0.
    assert not torch.allclose(seen["model.layers.0"], outputs[0], atol=1e-3)  # quantization changed block 0
    float_llama = _llama()
    with torch.no_grad():
        calls = capture_block_inputs(float_llama, float_llama.model.layers[1], [batches[0]])
        expected = first_tensor(float_llama.model.layers[1](outputs[0], *calls[0].args[1:], **calls[0].kwargs))
    torch.testing.assert_close(seen["model.layers.1"], expected, rtol=1e-4, atol=1e-4)


def test_layers_outside_blocks_are_calibrated_after_them():
    model, batches = _llama(), _ids(2)
    ctx = Context(options=RunOptions(progress=False))
    q = quantize(model, GPTQConfig(bits=4, group_size=16, layers=_everything()), data=batches, ctx=ctx)
    assert isinstance(q.lm_head, QLinear)
    (record,) = [p for p in ctx.report.passes if p.name == "quantize/gptq"]
    assert record.stats["outside_blocks"] == ["lm_head"]


def _everything():
    return LayerFilter()


def test_gpt2_is_quantized_through_linear_stand_ins():
    model, batches = _gpt2(), _ids(4)
    ctx = Context(options=RunOptions(progress=False))
    q = quantize(model, GPTQConfig(bits=8, group_size=16), data=batches, ctx=ctx)
    assert isinstance(q.transformer.h[1].attn.c_attn, QLinear)
    with torch.no_grad():
        cos = torch.cosine_similarity(q(*batches[0]).logits, model(*batches[0]).logits, dim=-1)
    assert float(cos.min()) > 0.999


def test_a_forward_that_never_reaches_the_blocks_is_an_error():
    model = _llama()
    with pytest.raises(DataError, match="never reached its first block"):
        capture_block_inputs(model, nn.Linear(2, 2), _ids(1))


def _is_cache_like(value) -> bool:
    from transformers.cache_utils import Cache

    if isinstance(value, Cache):
        return True
    return callable(getattr(value, "update", None)) and callable(getattr(value, "get_seq_length", None))


def _caches_in(value, where: str = "") -> list[str]:
    """Where in a nested args/kwargs structure a cache object sits."""
    if _is_cache_like(value):
        return [where]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _caches_in(v, f"{where}[{k!r}]")]
    if isinstance(value, (tuple, list)):
        return [p for i, v in enumerate(value) for p in _caches_in(v, f"{where}[{i}]")]
    return []


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama-keyword-cache", "gpt2-positional-cache"])
def test_a_recorded_call_holds_no_cache(build):
    model, batches = build(), _ids(2)
    _, blocks = find_blocks(model)
    seen = {}  # what the model itself hands its first block: a live cache, by keyword or position
    h = blocks[0].register_forward_pre_hook(lambda _m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        model(*batches[0])
    h.remove()
    assert _caches_in((seen["args"], seen["kwargs"])), "the model no longer passes a cache; this test checks nothing"
    for call in capture_block_inputs(model, blocks[0], batches):
        assert _caches_in((call.args, call.kwargs)) == []
        assert call.kwargs.get("use_cache", False) is False
        assert not {"past_key_values", "past_key_value", "layer_past", "cache"} & set(call.kwargs)


class _DuckCache:
    """Not a transformers Cache, but shaped like one: it appends the keys it is given."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []

    def update(self, k: torch.Tensor) -> torch.Tensor:
        self.keys.append(k)
        return torch.cat(self.keys, dim=1)

    def get_seq_length(self) -> int:
        return sum(k.shape[1] for k in self.keys)


class _CachedBlock(nn.Module):
    """Mixes each position with the mean of every key the cache holds: stale keys change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, kv: _DuckCache | None = None, memo: _DuckCache | None = None) -> torch.Tensor:
        keys = x
        for cache in (kv, memo):
            if cache is not None:
                keys = cache.update(keys)
        return self.proj(x + keys.mean(dim=1, keepdim=True))


class _CachedStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_CachedBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv, memo = _DuckCache(), _DuckCache()
        for block in self.blocks:
            x = block(x, kv, memo=memo)  # one cache positionally, one by an unknown keyword
        return x


def test_cache_shaped_objects_are_dropped_by_position_and_by_keyword():
    torch.manual_seed(0)
    model, x = _CachedStack().eval(), torch.randn(2, 5, 8)
    (call,) = capture_block_inputs(model, model.blocks[0], [(x,)])
    assert call.args[1] is None and "memo" not in call.kwargs
    first = first_tensor(model.blocks[0](*call.args, **call.kwargs))
    again = first_tensor(model.blocks[0](*call.args, **call.kwargs))
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # a rerun sees no keys of the run before


def test_gptq_blocks_are_calibrated_on_what_the_quantized_model_feeds_them():
    """Every block's calibration inputs are, to float tolerance, the inputs (and its outputs the outputs) that
    a fresh forward of the GPTQ-quantized Llama gives it: nothing stale (no KV cache) is carried between runs."""
    model, batches = _llama(), _ids(3)
    layers = model.model.layers
    runs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(layers))}

    def record(i: int):
        def hook(_m, args, kwargs, out) -> None:  # (hidden states in, hidden states out)
            hidden = args[0] if args else kwargs["hidden_states"]
            runs[i].append((hidden.detach().clone(), first_tensor(out).detach().clone()))

        return hook

    hooks = [b.register_forward_hook(record(i), with_kwargs=True) for i, b in enumerate(layers)]
    cfg = GPTQConfig(bits=3, group_size=16, calibration_batches=len(batches))
    quantize(model, cfg, data=batches, ctx=Context(options=RunOptions(progress=False)), inplace=True)
    assert isinstance(layers[1].self_attn.q_proj, QLinear)
    # Each block ran on its recorded calls at least twice (GPTQ's statistics, then the quantized block
    # feeding the next); the last run, by the quantized block, is what the next block was calibrated on.
    assert all(len(r) >= 2 * len(batches) for r in runs.values())
    calibrated = {i: r[-len(batches) :] for i, r in runs.items()}
    for r in runs.values():
        r.clear()
    with torch.no_grad():
        for batch in batches:
            model(*batch)  # the model's default: a fresh KV cache for this one forward
    for h in hooks:
        h.remove()
    fresh = runs
    for i in range(len(layers)):
        for (cal_in, cal_out), (ref_in, ref_out) in zip(calibrated[i], fresh[i], strict=True):
            torch.testing.assert_close(cal_in, ref_in, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"block {i} input: {m}")
            torch.testing.assert_close(
                cal_out, ref_out, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"block {i} output: {m}"
            )


# GPTQ vs round-to-nearest, both 3-bit group 128 on the block Linears, on the small tiny-lm's own Hugging Face
# model called as is (its blocks get a live KV cache, which calibration must drop). Measured: perplexity 5.2207
# float, 5.3410 RTN, 5.2344 GPTQ (RTN - GPTQ = 0.107); the margin asks for about half of that.
GPTQ_OVER_RTN_MARGIN = 0.05


def test_gptq_on_tiny_lm_called_with_its_cache_beats_round_to_nearest_by_a_margin(tiny_lm):
    wrapper, base = tiny_lm
    lm = wrapper.lm  # LlamaForCausalLM; called with input_ids only, it builds and passes a DynamicCache
    assert lm.config.use_cache
    no_head = LayerFilter(exclude=(r"lm_head$",))
    data = TinyLMEntry(SMALL_SPEC).calibration_data(32, 8)
    gq = quantize(
        lm,
        GPTQConfig(bits=3, group_size=128, layers=no_head),
        data=data,
        ctx=Context(options=RunOptions(progress=False)),
    )
    rtn = quantize(lm, WeightOnlyConfig(bits=3, symmetric=False, granularity="group", group_size=128, layers=no_head))

    def ppl(model: nn.Module) -> float:
        return perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits)

    gptq_ppl, rtn_ppl = ppl(gq), ppl(rtn)
    assert sum(isinstance(m, QLinear) for m in gq.modules()) == 7 * SMALL_SPEC.layers
    assert base < gptq_ppl < rtn_ppl
    assert rtn_ppl - gptq_ppl >= GPTQ_OVER_RTN_MARGIN, f"RTN {rtn_ppl:.4f} vs GPTQ {gptq_ppl:.4f}"
