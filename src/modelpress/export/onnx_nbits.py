"""Group-wise low-bit weights in ONNX: each MatMul of a group-quantized `QLinear` becomes ONNX Runtime's
`com.microsoft.MatMulNBits`, carrying our codes, scales and zero points as they are (no re-quantization).

`MatMulNBits` computes `A @ dequant(B)` with B quantized block-wise along K (the input width), which is
exactly `QLinear`'s group layout: one scale (and zero point) per output row and group of `block_size`
consecutive inputs. Its inputs:

- `B` uint8 (N, ceil(K / block_size), block_size * bits / 8): each block's unsigned codes as a
  little-endian bitstream (`primitives.packing.pack_bits`; for 4 bits, the first code in the low nibble).
  A K that `block_size` does not divide ends in a padded block, as ORT expects; `QLinear` stores the
  same padding (the zero point's code, dequantized to 0), so its codes go in as they are;
- `scales` float (N * ceil(K / block_size),), row-major (N, groups);
- `zero_points` uint8, each row's group zero points packed the same way and padded to a whole byte;
  left out for symmetric codes, which are stored offset by `2^(bits-1)`, ORT's default zero point.

ORT requires `block_size` to be a power of two, at least 16; the CPU kernel takes 2, 4 and 8 bits (probed
by `supported_bits`). Other layers are left for `onnx_int8.quantize_graph`.

    >>> done = lower_matmul_nbits(proto, {n: m for n, m in model.named_modules() if isinstance(m, QLinear)})
    >>> export_nbits_onnx(qmodel, entry.example_inputs(1), "out/model.onnx")   # export + rewrite + parity
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.export.onnx_float import export_float
from modelpress.export.onnx_graph import (
    MS_DOMAIN,
    ExportError,
    add_session_hints,
    as_tuple,
    check_parity,
    replace_nodes,
    weight_key,
)
from modelpress.export.onnx_int8 import quantize_graph
from modelpress.export.onnx_standins import swap_in_float
from modelpress.export.onnx_tables import gather_block_quantized, gather_table
from modelpress.primitives.affine import QuantScheme, quantize_tensor
from modelpress.primitives.packing import pack_bits, to_unsigned
from modelpress.quant.modules import QConv, QLinear

log = logging.getLogger(__name__)

MIN_COSINE = 0.999  # the same codes and scales: only float summation order differs from the eager layer
TABLES_MIN_COSINE = 0.95  # with embedding tables quantized by the export, which the eager model keeps float
CANDIDATE_BITS = (2, 3, 4, 5, 6, 7, 8)


def unsupported_reason(layer: nn.Module, bits: Sequence[int] | None = None, channels: bool = False) -> str | None:
    """Why `layer` cannot become a `MatMulNBits` (None: it can). `channels`: per-channel weights are taken too,
    for a writer that puts them in blocks carrying the row's scale (the GenAI decoder: `genai_graph`)."""
    if not isinstance(layer, QLinear):
        return f"{type(layer).__name__} is not a QLinear"
    ws = layer.weight_scheme
    allowed = supported_bits() if bits is None else tuple(bits)
    per_channel = channels and ws.granularity == "channel"
    if ws.granularity != "group" and not per_channel:
        return f"per-{ws.granularity} weights (MatMulNBits takes group-wise weights)"
    if ws.bits not in allowed:
        return f"int{ws.bits} weights (ONNX Runtime runs MatMulNBits with {allowed} bits)"
    gs = ws.group_size
    if not per_channel and (gs < 16 or gs & (gs - 1)):
        return f"group_size {gs} (MatMulNBits needs a power of two >= 16)"
    if layer.act.mode != "none":
        return f"{layer.act.mode} activation quantization (MatMulNBits keeps activations in float)"
    return None


def nbits_tensors(layer: QLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero_points) of `layer` in MatMulNBits layout; zero points None for symmetric codes."""
    ws = layer.weight_scheme
    n, groups, gs = layer.weight_q.shape  # (N, G, group_size)
    u = to_unsigned(layer.weight_q, ws)  # (N, G, gs) in [0, 2^bits)
    blob = gs * ws.bits // 8  # gs is a power of two >= 16: every block ends on a byte boundary
    b = pack_bits(u, ws.bits).reshape(n, groups, blob).numpy()
    scales = layer.weight_scale.float().reshape(n * groups).numpy()
    if ws.symmetric:
        return b, scales, None
    zp = layer.weight_zero_point.reshape(n, groups).to(torch.uint8)
    zp_packed = torch.stack([pack_bits(row, ws.bits) for row in zp])  # (N, ceil(G * bits / 8))
    return b, scales, zp_packed.reshape(-1).numpy()


def lower_matmul_nbits(proto: Any, layers: dict[str, Any], accuracy_level: int = 0) -> set[str]:
    """Rewrite `proto` in place: each MatMul whose weight is a group-wise layer's dequantized weight (K, N)
    becomes `MatMulNBits` with that layer's codes. Returns the names of the layers rewritten.

    `layers` may hold any quantized layers; those `MatMulNBits` cannot take are left untouched.
    `accuracy_level` is ORT's attribute (0: float compute; 4: int8 compute of the activations, faster).
    """
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ExportError(f"accuracy_level must be one of 0, 1, 2, 3, 4, got {accuracy_level}")
    by_key = {}
    for name, layer in layers.items():
        if unsupported_reason(layer) is None:
            by_key[weight_key(layer.dequantized_weight().t().numpy())] = name
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in graph.output}
    done: set[str] = set()
    folded: set[int] = set()  # ids of bias Adds taken into a MatMulNBits
    new_nodes = []
    for node in graph.node:
        if id(node) in folded:
            continue
        t = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        name = by_key.get(weight_key(numpy_helper.to_array(t))) if t is not None and len(t.dims) == 2 else None
        if name is None:
            new_nodes.append(node)
            continue
        layer = layers[name]
        b, scales, zp = nbits_tensors(layer)
        stem = f"{name}.nbits"
        extra = [numpy_helper.from_array(b, f"{stem}.B"), numpy_helper.from_array(scales, f"{stem}.scales")]
        inputs = [node.input[0], f"{stem}.B", f"{stem}.scales"]
        inputs.append("")
        if zp is not None:
            extra.append(numpy_helper.from_array(zp, f"{stem}.zero_points"))
            inputs[-1] = f"{stem}.zero_points"
        out = node.output[0]
        add = _bias_add(out, consumers, inits, outputs, layer.out_features)
        if add is not None:  # the bias Add goes into the op (input 5; g_idx, input 4, stays empty)
            inputs += ["", add.input[1] if add.input[0] == out else add.input[0]]
            folded.add(id(add))
            out = add.output[0]
        while inputs[-1] == "":
            inputs.pop()
        graph.initializer.extend(extra)
        new_nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [out],
                name=f"{stem}.MatMulNBits",
                domain=MS_DOMAIN,
                K=layer.in_features,
                N=layer.out_features,
                bits=layer.weight_scheme.bits,
                block_size=layer.weight_scheme.group_size,
                accuracy_level=accuracy_level,
            )
        )
        done.add(name)
    replace_nodes(proto, new_nodes, contrib_ops=bool(done))
    return done


def _bias_add(
    out: str, consumers: dict[str, list[Any]], inits: dict[str, Any], outputs: set[str], n: int
) -> Any | None:
    """The Add of a constant float (N,) bias that is the only consumer of `out`, if there is one."""
    users = consumers.get(out, [])
    if len(users) != 1 or out in outputs or users[0].op_type != "Add":
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    t = inits.get(other)
    return add if t is not None and t.data_type == 1 and list(t.dims) == [n] else None


@lru_cache(maxsize=1)
def supported_bits() -> tuple[int, ...]:
    """Bit widths ONNX Runtime's CPU `MatMulNBits` runs correctly here (probed once on a tiny graph)."""
    import onnxruntime as ort

    ok = []
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a refused bit width is the expected answer, not an error to print
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen)
    for bits in CANDIDATE_BITS:
        linear = nn.Linear(64, 8, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(8, 64, generator=gen))
        layer = QLinear.from_float(linear, QuantScheme(bits, False, "group", 0, 32))
        b, scales, zp = nbits_tensors(layer)
        node = helper.make_node("MatMulNBits", ["x", "B", "s", "zp"], ["y"], domain=MS_DOMAIN,
                                K=64, N=8, bits=bits, block_size=32)  # fmt: skip
        graph = helper.make_graph(
            [node],
            "probe",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 64])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 8])],
            [numpy_helper.from_array(a, n) for a, n in ((b, "B"), (scales, "s"), (zp, "zp"))],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
        try:
            sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            y = sess.run(None, {"x": x.numpy()})[0]
        except Exception:  # noqa: BLE001  (any refusal means: not supported)
            continue
        with torch.no_grad():
            expected = layer(x).numpy()
        if np.allclose(y, expected, atol=1e-3 * max(1.0, float(np.abs(expected).max()))):
            ok.append(bits)
    return tuple(ok)


def lower_gather_nbits(proto: Any, bits: int = 4, block_size: int = 32, min_size: int = 1 << 16) -> list[str]:
    """Rewrite `proto` in place: large float embedding tables read by `Gather` become `GatherBlockQuantized`.

    A weight-only choice of the export (the eager model keeps float tables): each row is quantized
    symmetrically in blocks of `block_size` values (round to nearest), codes packed along the row, so
    only the gathered rows are dequantized. Tables with fewer than `min_size` values stay float.
    Returns the names of the tables rewritten.
    """
    if bits not in (2, 4, 8) or block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"GatherBlockQuantized takes 2, 4 or 8 bits and a power-of-two block >= 16, "
                          f"got bits={bits}, block_size={block_size}")  # fmt: skip
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    scheme = QuantScheme(bits, True, "group", 0, block_size)
    packed: dict[str, tuple[str, str]] = {}
    new_nodes = []
    for node in graph.node:
        row_gather = node.op_type == "Gather" and all(a.i == 0 for a in node.attribute if a.name == "axis")
        name = node.input[0] if row_gather else ""
        if name and name not in packed and (array := gather_table(inits, node, min_size)) is not None:
            if array.shape[1] % block_size == 0:
                table = torch.from_numpy(array.copy())  # (V, H)
                qt = quantize_tensor(table, scheme)
                codes = pack_bits(to_unsigned(qt.q, scheme), bits).reshape(table.shape[0], -1)  # (V, H * bits / 8)
                scales = qt.scale.reshape(table.shape[0], -1)  # (V, H / block)
                stem = f"{name}.q{bits}"
                graph.initializer.extend([numpy_helper.from_array(codes.numpy(), f"{stem}.data"),
                                          numpy_helper.from_array(scales.numpy(), f"{stem}.scales")])  # fmt: skip
                packed[name] = (f"{stem}.data", f"{stem}.scales")
        if name not in packed:
            new_nodes.append(node)
            continue
        data, scales_name = packed[name]
        gbq_name = f"{node.name or name}.q{bits}"
        new_nodes.append(
            gather_block_quantized([data, node.input[1], scales_name], node.output[0], bits, block_size, gbq_name)
        )
    replace_nodes(proto, new_nodes, contrib_ops=bool(packed))
    return sorted(packed)


def export_nbits_onnx(
    model: nn.Module,
    example_inputs: Any,
    out_path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    accuracy_level: int = 0,
    embeddings: Literal["float", "int8", "int4"] = "int8",
    opset: int = 17,
) -> Path:
    """Export `model` with its group-wise layers as `MatMulNBits` and its other quantized layers as in
    `onnx_quant.export_quantized_onnx`; written atomically, checked against the eager model.

    `embeddings`: large Gather tables stay float, become int8 per row (`onnx_quant`), or 4-bit in
    blocks of 32 (`lower_gather_nbits`), a weight-only choice of the export.
    """
    inputs = as_tuple(example_inputs)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QLinear, QConv))}
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        export_float(model, inputs, tmp, input_names, output_names, True, opset, swap_in_float, True)
        proto = onnx.load(str(tmp))
        done = lower_matmul_nbits(proto, layers, accuracy_level)
        if embeddings == "int4":
            lower_gather_nbits(proto, 4, 32)
        rest = {n: m for n, m in layers.items() if n not in done}
        table_bits = "int8" if embeddings == "int8" else "float"
        found = quantize_graph(proto, rest, embeddings=table_bits) if rest or table_bits == "int8" else set()
        missing = sorted(set(rest) - found)
        if missing:
            raise ExportError(f"no ONNX MatMul/Conv carries the weights of {missing[:5]}; cannot export them")
        add_session_hints(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        parity = check_parity(model, tmp, inputs)
        # Tables rounded in the export only differ from the eager model: then only a wrong mapping is caught.
        if parity["mean_cosine"] < (MIN_COSINE if embeddings == "float" else TABLES_MIN_COSINE):
            raise ExportError(f"the MatMulNBits graph does not compute what the quantized model computes: {parity}")
    log.info("MatMulNBits: %d of %d quantized layers", len(done), len(layers))
    return out_path
