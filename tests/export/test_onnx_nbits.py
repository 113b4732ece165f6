"""MatMulNBits export: our group-wise codes in ONNX Runtime's low-bit MatMul, bit for bit."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from modelpress.core import Context, RunOptions
from modelpress.export.onnx import check_parity
from modelpress.export.onnx_nbits import export_nbits_onnx, nbits_tensors, supported_bits, unsupported_reason
from modelpress.primitives.packing import from_unsigned, unpack_bits
from modelpress.quant import QLinear, WeightOnlyConfig, quantize
from modelpress.quant.gptq import GPTQConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 16)).eval()


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_ort_runs_4_bit_and_refuses_nothing_we_claim():
    assert {2, 4, 8} <= set(supported_bits())


@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_tensors_unpack_to_our_codes(symmetric):
    q = quantize(_mlp(), WeightOnlyConfig(bits=4, symmetric=symmetric, granularity="group", group_size=32))[0]
    b, scales, zp = nbits_tensors(q)
    assert b.shape == (128, 2, 16) and b.dtype.name == "uint8"  # (N, K / block, block * 4 / 8)
    codes = unpack_bits(torch.from_numpy(b.copy()), 4, 128 * 64).view(128, 2, 32)
    assert torch.equal(from_unsigned(codes, q.weight_scheme), q.weight_q)
    torch.testing.assert_close(torch.from_numpy(scales.copy()), q.weight_scale.reshape(-1))
    if symmetric:
        assert zp is None
    else:
        assert zp.shape == (128,)  # 2 groups of 4 bits: one byte per row
        zps = unpack_bits(torch.from_numpy(zp.copy()), 4, 256).view(128, 2)
        assert torch.equal(zps.to(torch.int32), q.weight_zero_point.reshape(128, 2))


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (2, False), (8, True)])
def test_export_matches_the_eager_layers(tmp_path, bits, symmetric):
    model = _mlp()
    q = quantize(model, WeightOnlyConfig(bits=bits, symmetric=symmetric, granularity="group", group_size=32))
    x = torch.randn(7, 64)
    path = export_nbits_onnx(q, (x,), tmp_path / "m.onnx", embeddings="float")
    assert _ops(path).count("MatMulNBits") == 3 and "MatMul" not in _ops(path)
    assert check_parity(q, path, (torch.randn(3, 64),))["mean_cosine"] >= 0.999


def test_unsupported_layers_keep_the_dequantized_form(tmp_path):
    q = quantize(_mlp(), WeightOnlyConfig(bits=3, symmetric=False, granularity="group", group_size=32))
    assert "int3" in unsupported_reason(q[0])
    q8 = quantize(_mlp(), WeightOnlyConfig(bits=4, granularity="group", group_size=8))
    assert "power of two >= 16" in unsupported_reason(q8[0])
    path = export_nbits_onnx(q, (torch.randn(2, 64),), tmp_path / "m.onnx", embeddings="float")
    assert "MatMulNBits" not in _ops(path)
    assert check_parity(q, path, (torch.randn(3, 64),))["mean_cosine"] >= 0.999


def test_gptq_llama_exports_with_its_own_codes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
            self.lm = LlamaForCausalLM(config)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits

    model = Logits().eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 64, (2, 16), generator=g),) for _ in range(4)]
    q = quantize(model, GPTQConfig(bits=4, group_size=32), data=data, ctx=Context(options=RunOptions(progress=False)))
    path = export_nbits_onnx(q, data[0], tmp_path / "lm.onnx", embeddings="float")
    n_quantized = sum(isinstance(m, QLinear) for m in q.modules())
    assert n_quantized == 14 and _ops(path).count("MatMulNBits") == n_quantized
    assert check_parity(q, path, (torch.randint(0, 64, (3, 16)),))["mean_cosine"] >= 0.999  # batch axis dynamic


def test_int4_embedding_tables_become_gather_block_quantized(tmp_path):
    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.table = nn.Embedding(2048, 64)  # 131k values: large enough to be packed
            self.proj = nn.Linear(64, 32)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.proj(self.table(ids))

    q = quantize(Embedder().eval(), WeightOnlyConfig(bits=4, symmetric=False, granularity="group", group_size=32))
    ids = torch.randint(0, 2048, (2, 12))
    path = export_nbits_onnx(q, (ids,), tmp_path / "e.onnx", embeddings="int4")
    ops = _ops(path)
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops and "Gather" not in ops
    assert path.stat().st_size < 2048 * 64 * (0.5 + 4 / 32) * 1.1 + 20_000  # 4-bit codes + fp32 block scales
    assert check_parity(q, path, (ids,))["mean_cosine"] >= 0.99  # the table is rounded in the export only
