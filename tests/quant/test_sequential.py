"""Sequential calibration: finding blocks, capturing their inputs, feeding quantized outputs forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core import Context, DataError
from modelpress.primitives.affine import QuantScheme
from modelpress.quant import QLinear, quantize
from modelpress.quant.gptq import GPTQConfig
from modelpress.quant.ptq import _set_submodule
from modelpress.quant.sequential import (
    Scope,
    capture_block_inputs,
    convert_conv1d,
    find_blocks,
    first_tensor,
    run_sequential,
)

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
            _set_submodule(model, name, QLinear.from_float(layer, scheme))

    stats = run_sequential(model, batches, selected, rtn_block, Context(show_progress=False), "test")
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
    ctx = Context(show_progress=False)
    q = quantize(model, GPTQConfig(bits=4, group_size=16, layers=_everything()), data=batches, ctx=ctx)
    assert isinstance(q.lm_head, QLinear)
    (record,) = [p for p in ctx.report.passes if p.name == "quantize/gptq"]
    assert record.stats["outside_blocks"] == ["lm_head"]


def _everything():
    from modelpress.quant import LayerFilter

    return LayerFilter()


def test_gpt2_is_quantized_through_linear_stand_ins():
    model, batches = _gpt2(), _ids(4)
    ctx = Context(show_progress=False)
    q = quantize(model, GPTQConfig(bits=8, group_size=16), data=batches, ctx=ctx)
    assert isinstance(q.transformer.h[1].attn.c_attn, QLinear)
    with torch.no_grad():
        cos = torch.cosine_similarity(q(*batches[0]).logits, model(*batches[0]).logits, dim=-1)
    assert float(cos.min()) > 0.999


def test_a_forward_that_never_reaches_the_blocks_is_an_error():
    model = _llama()
    with pytest.raises(DataError, match="never reached its first block"):
        capture_block_inputs(model, nn.Linear(2, 2), _ids(1))
