"""Dense packing of sub-byte integers into uint8 storage.

Two layouts, both "first element in the low bits":

- `pack_bits`: any width 1..8 as one little-endian bitstream. Value `i` occupies stream bits
  `[i * bits, (i + 1) * bits)`, and stream bit `j` is bit `j % 8` of byte `j // 8`: 4-bit packs two
  values per byte (first in the low nibble), 2-bit four per byte, 3-bit eight values in 3 bytes.
  Nothing is wasted: `numel` values take `ceil(numel * bits / 8)` bytes.
- `pack_int4_pairs`: 4-bit pairs along the last axis, keeping the leading shape: byte
  `out[..., k] = q[..., 2k] | q[..., 2k + 1] << 4` (low nibble = even index). This is the layout of
  ONNX Runtime's `MatMulNBits` input B, uint8 `[N, n_blocks_per_col, blob_size]` with
  `blob_size = block_size * bits / 8` ("for 4 bits, the first element is stored in the lower 4 bits"),
  and of ORT's `pack_bytes_to_4bit`. For 2, 4 and 8 bits `pack_bits` gives the same bytes per block.

Packing works on unsigned codes: `to_unsigned` offsets a symmetric scheme's signed values by
`2^(bits-1)` (so signed zero becomes ORT's default zero point, 8 for 4 bits).

    >>> u = to_unsigned(qt.q, scheme)                       # (N, K) uint8 in [0, 16)
    >>> b = pack_int4_pairs(u.view(N, K // 32, 32))         # (N, K // 32, 16): MatMulNBits "B"
    >>> packed = pack_bits(u, 3)                            # 3-bit: 8 values per 3 bytes
    >>> u2 = unpack_bits(packed, 3, u.numel()).view(u.shape)
"""

from __future__ import annotations

import torch

from modelpress.primitives.affine import QuantScheme

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_codes(q: torch.Tensor, bits: int) -> None:
    """Unsigned codes only: an out-of-range value would silently corrupt its neighbours."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8] for packing, got {bits}")
    if q.dtype not in _INT_DTYPES:
        raise ValueError(f"packing needs an integer tensor of unsigned codes, got dtype {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(
            f"values must be in [0, {2**bits - 1}] for {bits}-bit packing, got [{int(q.min())}, {int(q.max())}]; "
            "offset signed values with to_unsigned first"
        )


def packed_size(numel: int, bits: int) -> int:
    """Bytes that `numel` values of `bits` bits take when packed densely."""
    return (numel * bits + 7) // 8


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes (any shape) into a flat little-endian uint8 bitstream.

    >>> pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 4)
    tensor([33,  3], dtype=torch.uint8)
    """
    _check_codes(q, bits)
    flat = q.reshape(-1)
    numel = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8)
    # 8 values of `bits` bits fill exactly `bits` bytes: build each chunk as one int64 word
    # (at most 7 * 8 = 56 bits, so no sign trouble), then cut the word into bytes.
    n_chunks = -(-numel // 8)
    pad = torch.zeros(n_chunks * 8 - numel, dtype=flat.dtype, device=flat.device)
    chunks = torch.cat([flat, pad]).view(n_chunks, 8)  # (C, 8)
    word = torch.zeros(n_chunks, dtype=torch.int64, device=flat.device)
    for k in range(8):
        word |= chunks[:, k].to(torch.int64) << (k * bits)
    out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(bits)], dim=1)  # (C, bits)
    return out.to(torch.uint8).reshape(-1)[: packed_size(numel, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` codes as a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8] for packing, got {bits}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed data must be uint8, got {packed.dtype}")
    flat = packed.reshape(-1)
    if flat.numel() != packed_size(numel, bits):
        raise ValueError(
            f"{numel} values of {bits} bits take {packed_size(numel, bits)} bytes, got {flat.numel()} bytes"
        )
    if bits == 8:
        return flat.clone()
    n_chunks = -(-numel // 8)
    pad = torch.zeros(n_chunks * bits - flat.numel(), dtype=torch.uint8, device=flat.device)
    chunks = torch.cat([flat, pad]).view(n_chunks, bits)  # (C, bits)
    word = torch.zeros(n_chunks, dtype=torch.int64, device=flat.device)
    for b in range(bits):
        word |= chunks[:, b].to(torch.int64) << (8 * b)
    mask = (1 << bits) - 1
    out = torch.stack([(word >> (k * bits)) & mask for k in range(8)], dim=1)  # (C, 8)
    return out.to(torch.uint8).reshape(-1)[:numel]


def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes in pairs along the last axis: (..., L) -> (..., ceil(L / 2)) uint8.

    Low nibble = even index; an odd last element gets a zero high nibble.

    >>> pack_int4_pairs(torch.tensor([[1, 2, 3]], dtype=torch.uint8))
    tensor([[33,  3]], dtype=torch.uint8)
    """
    _check_codes(q, 4)
    if q.dim() == 0:
        raise ValueError("pack_int4_pairs needs at least one dimension")
    u = q.to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], 1)], dim=-1)
    pairs = u.view(*u.shape[:-1], u.shape[-1] // 2, 2)  # (..., L/2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4_pairs(packed: torch.Tensor, last_dim: int | None = None) -> torch.Tensor:
    """Inverse of `pack_int4_pairs`: (..., P) -> (..., last_dim or 2P) uint8 codes in [0, 16)."""
    if packed.dtype != torch.uint8 or packed.dim() == 0:
        raise ValueError(f"packed data must be a uint8 tensor with at least one dimension, got {packed.dtype}")
    n = 2 * packed.shape[-1] if last_dim is None else last_dim
    if not 2 * packed.shape[-1] - 1 <= n <= 2 * packed.shape[-1]:
        raise ValueError(f"last_dim {last_dim} does not fit {packed.shape[-1]} packed bytes")
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1)  # (..., P, 2)
    return out.reshape(*packed.shape[:-1], -1)[..., :n]


def to_unsigned(q: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Codes in `[0, 2^bits)`: a symmetric scheme's signed values shifted by `2^(bits-1)`.

    uint8 for up to 8 bits, int32 above. Asymmetric schemes are unsigned already.
    """
    if q.numel() and (int(q.min()) < scheme.qmin or int(q.max()) > scheme.qmax):
        raise ValueError(
            f"values must be in [{scheme.qmin}, {scheme.qmax}] for this scheme, got [{int(q.min())}, {int(q.max())}]"
        )
    offset = 2 ** (scheme.bits - 1) if scheme.symmetric else 0
    u = q.to(torch.int32) + offset
    return u.to(torch.uint8) if scheme.bits <= 8 else u


def from_unsigned(u: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Inverse of `to_unsigned`: values in the scheme's storage dtype."""
    offset = 2 ** (scheme.bits - 1) if scheme.symmetric else 0
    return (u.to(torch.int32) - offset).to(scheme.storage_dtype)
