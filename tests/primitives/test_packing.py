"""Sub-byte packing: round trips, sizes, the bit layout, and ONNX Runtime's MatMulNBits layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.primitives.affine import QuantScheme, dequantize_tensor, quantize_tensor
from modelpress.primitives.packing import (
    from_unsigned,
    pack_bits,
    pack_int4_pairs,
    packed_size,
    to_unsigned,
    unpack_bits,
    unpack_int4_pairs,
)

SETTINGS = settings(max_examples=50, deadline=None)


def random_codes(shape: tuple[int, ...], bits: int, seed: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=g).to(dtype)


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple),
    bits=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64]),
)
def test_pack_bits_round_trip(shape: tuple[int, ...], bits: int, seed: int, dtype: torch.dtype) -> None:
    q = random_codes(shape, bits, seed, dtype)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(q.numel() * bits / 8)
    out = unpack_bits(packed, bits, q.numel())
    assert out.dtype == torch.uint8
    assert torch.equal(out.view(shape), q.to(torch.uint8))


@SETTINGS
@given(numel=st.integers(1, 40), bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_pack_bits_is_a_little_endian_bitstream(numel: int, bits: int, seed: int) -> None:
    """Stream bit i * bits + k holds bit k of value i; stream bit j is bit j % 8 of byte j // 8."""
    q = random_codes((numel,), bits, seed)
    packed = pack_bits(q, bits)
    stream = [(int(packed[j // 8]) >> (j % 8)) & 1 for j in range(packed.numel() * 8)]
    for i, v in enumerate(q.tolist()):
        assert sum(stream[i * bits + k] << k for k in range(bits)) == v
    assert not any(stream[numel * bits :]), "padding bits must be zero"


def test_pack_bits_hand_examples() -> None:
    four = torch.tensor([0x1, 0x2, 0x3], dtype=torch.uint8)
    assert pack_bits(four, 4).tolist() == [0x21, 0x03]
    two = torch.tensor([0, 1, 2, 3, 3], dtype=torch.uint8)
    assert pack_bits(two, 2).tolist() == [0b11100100, 0b11]
    # 3-bit: 8 values in 3 bytes; values 0..7 -> bits 000 100 010 110 001 101 011 111 (LSB first)
    three = torch.arange(8, dtype=torch.uint8)
    assert pack_bits(three, 3).tolist() == [0b10001000, 0b11000110, 0b11111010]
    assert packed_size(9, 3) == 4 and packed_size(0, 5) == 0


def test_int4_pairs_hand_example() -> None:
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    packed = pack_int4_pairs(q)
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]  # low nibble = even index
    assert torch.equal(unpack_int4_pairs(packed), q)
    odd = torch.tensor([7, 8, 9], dtype=torch.uint8)
    assert pack_int4_pairs(odd).tolist() == [0x87, 0x09]  # the missing high nibble is zero
    assert unpack_int4_pairs(pack_int4_pairs(odd), 3).tolist() == [7, 8, 9]


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_int4_pairs_round_trip_and_agree_with_pack_bits(shape: tuple[int, ...], seed: int) -> None:
    q = random_codes(shape, 4, seed)
    packed = pack_int4_pairs(q)
    assert packed.shape == (*shape[:-1], math.ceil(shape[-1] / 2))
    assert torch.equal(unpack_int4_pairs(packed, shape[-1]), q)
    if shape[-1] % 2 == 0:  # rows pack to whole bytes: the same bytes as the flat bitstream
        assert torch.equal(packed.reshape(-1), pack_bits(q, 4))


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_to_unsigned_round_trip(bits: int, symmetric: bool) -> None:
    scheme = QuantScheme(bits=bits, symmetric=symmetric)
    q = torch.arange(scheme.qmin, scheme.qmax + 1).to(scheme.storage_dtype)
    u = to_unsigned(q, scheme)
    assert int(u.min()) == 0 and int(u.max()) == 2**bits - 1
    assert u.dtype == (torch.uint8 if bits <= 8 else torch.int32)
    back = from_unsigned(u, scheme)
    assert back.dtype == scheme.storage_dtype and torch.equal(back, q)
    if symmetric:  # signed zero becomes the midpoint (ORT's default zero point)
        assert int(to_unsigned(torch.zeros(1, dtype=torch.int8), scheme)) == 2 ** (bits - 1)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\].*to_unsigned"):
        pack_bits(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4_pairs(torch.tensor([-1, 3], dtype=torch.int8))
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\]"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="take 2 bytes, got 3"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 3)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        to_unsigned(torch.tensor([8], dtype=torch.int8), QuantScheme(bits=4))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layout_matches_onnxruntime_matmulnbits(bits: int) -> None:
    """ORT's MatMulNBits reads B as uint8 [N, n_blocks, blob_size], first element in the low bits,
    and packed zero points [N, ceil(n_blocks * bits / 8)]: its output must match our dequantized weight."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    n, k, block = 4, 64, 16
    n_blocks = k // block
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits))
    scheme = QuantScheme(bits=bits, symmetric=False, granularity="group", group_size=block)
    qt = quantize_tensor(w, scheme)  # q (N, n_blocks, block), scale / zero point (N, n_blocks, 1)
    b = pack_bits(to_unsigned(qt.q, scheme), bits).view(n, n_blocks, block * bits // 8)
    if bits == 4:
        assert torch.equal(b, pack_int4_pairs(qt.q))
    zp_rows = [pack_bits(row, bits) for row in qt.zero_point.reshape(n, n_blocks).to(torch.uint8)]
    initializers = {
        "B": b.numpy(),
        "scales": qt.scale.reshape(n, n_blocks).numpy(),
        "zero_points": torch.stack(zp_rows).reshape(-1).numpy(),
    }
    node = helper.make_node(
        "MatMulNBits", ["A", *initializers], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block
    )
    graph = helper.make_graph(
        [node],
        "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, n])],
        initializer=[numpy_helper.from_array(v, name) for name, v in initializers.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = torch.randn(2, k, generator=torch.Generator().manual_seed(0))
    (y,) = session.run(None, {"A": a.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), a @ dequantize_tensor(qt).T, rtol=1e-4, atol=1e-4)
