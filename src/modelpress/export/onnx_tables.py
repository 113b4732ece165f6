"""Embedding tables in an integer ONNX graph: a row `Gather` of a float table becomes integer codes + scales.

Per-row int8 codes are gathered and dequantized with plain ops; grouped or packed (<= 4-bit) tables of a
`QEmbedding` become ONNX Runtime's `GatherBlockQuantized` (unsigned codes, power-of-two blocks of a row).
Only the gathered rows are ever dequantized.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from modelpress.export.onnx_graph import MS_DOMAIN, ExportError, NodeBuilder
from modelpress.export.onnx_standins import MIN_EMBEDDING_SIZE
from modelpress.quant.modules import QEmbedding


def gather_table(inits: dict[str, Any], node: Any, min_size: int = MIN_EMBEDDING_SIZE) -> np.ndarray | None:
    """The float (V, D) table a row Gather reads, if it has at least `min_size` values."""
    t = inits.get(node.input[0]) if node.op_type == "Gather" else None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if t is None or t.data_type != 1 or len(t.dims) != 2 or axis != 0 or np.prod(t.dims) < min_size:
        return None
    return numpy_helper.to_array(t)


def gather_block_quantized(inputs: list[str], output: str, bits: int, block: int, name: str | None = None) -> Any:
    """ONNX Runtime's `GatherBlockQuantized` over (V, D) unsigned codes (zero point 2^(bits-1)) and (V, D / block)
    scales: `inputs` = [codes, ids, scales]."""
    return helper.make_node(
        "GatherBlockQuantized", inputs, [output], name=name, domain=MS_DOMAIN, bits=bits, block_size=block,
        gather_axis=0, quantize_axis=1,
    )  # fmt: skip


def integer_table(b: NodeBuilder, table: np.ndarray, q: QEmbedding | None) -> tuple[str, str, tuple[int, int] | None]:
    """A table as integer constants: (codes, scales, block). block None: int8 codes (V, D) with one symmetric
    scale per row (V, 1), the QEmbedding's own or quantized here; else (block size, bits) of unsigned codes
    for ONNX Runtime's GatherBlockQuantized, one scale per block of a row."""
    if q is None:
        absmax = np.abs(table).max(axis=1, keepdims=True)
        scale = np.where(absmax > 0, absmax / 127, 1).astype(np.float32)
        codes = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        return b.const("table", codes), b.const("row_scale", scale), None
    scale = q.weight_scale.float().numpy()  # (V, groups)
    if not q.packed and scale.shape[1] == 1:
        return b.const("table", q.weight_q.numpy()), b.const("row_scale", scale), None
    block = _gather_block(q)
    scale = np.repeat(scale, q.group_size // block, axis=1)  # a wide group as several equal blocks
    if q.packed:  # already two unsigned nibbles (offset 8) per byte: the layout the op reads at bits=4
        data, bits = q.weight_packed.numpy(), 4
    else:  # bits=8 reads unsigned bytes with zero point 128
        data, bits = (q.weight_q.numpy().astype(np.int16) + 128).astype(np.uint8), 8
    return b.const("table", data), b.const("block_scale", scale.astype(np.float32)), (block, bits)


def _gather_block(q: QEmbedding) -> int:
    """The largest power-of-two block (>= 16, GatherBlockQuantized's minimum) that divides the group."""
    block = 1 << (q.group_size.bit_length() - 1)
    while block >= 16 and q.group_size % block:
        block >>= 1
    if block < 16:
        raise ExportError(
            f"an embedding quantized in groups of {q.group_size} cannot be exported: ONNX Runtime's "
            "GatherBlockQuantized needs groups that a power of two >= 16 divides (e.g. group_size 32, 64 or 128)"
        )
    return block


def lower_gather(b: NodeBuilder, node: Any, codes: str, scales: str, blocks: tuple[int, int] | None) -> list[Any]:
    """Gather the integer rows and their scales, then dequantize only the gathered rows."""
    if blocks is not None:
        block, bits = blocks
        return [gather_block_quantized([codes, node.input[1], scales], node.output[0], bits, block, b.name("gbq"))]
    rows = b.node("Gather", [codes, node.input[1]], axis=0)
    row_scales = b.node("Gather", [scales, node.input[1]], axis=0)
    cast = b.node("Cast", [rows.output[0]], to=1)
    mul = b.node("Mul", [cast.output[0], row_scales.output[0]])
    mul.output[0] = node.output[0]
    return [rows, row_scales, cast, mul]
