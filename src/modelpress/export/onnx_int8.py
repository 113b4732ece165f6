"""The integer rewrite of an exported float graph: weights equal to a quantized layer's dequantized weight
become ONNX Runtime's integer operators with that layer's own codes and scales (`quantize_graph`).

What each layer becomes (activation modes, merged projections, QAttention, ConvInteger, embedding tables)
is described in `export.onnx_quant`, the export that runs this rewrite and checks its result; group-wise
weight-only layers are taken first by `export.onnx_nbits` (`MatMulNBits`).

    >>> found = quantize_graph(proto, {n: m for n, m in model.named_modules() if isinstance(m, QLinear)})
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from onnx import helper, numpy_helper

from modelpress.export.onnx_graph import MS_DOMAIN, ExportError, ExportWarning, NodeBuilder, replace_nodes, weight_key
from modelpress.export.onnx_standins import qparams
from modelpress.export.onnx_tables import gather_table, integer_table, lower_gather
from modelpress.quant.modules import ActSpec, QConv, QEmbedding, QLinear

log = logging.getLogger(__name__)

_TINY = np.float32(np.finfo(np.float32).tiny)  # scale floor: an all-zero row still quantizes to zeros


@dataclass
class _Layer:
    """One quantized layer (or several merged along N) in ONNX layout: codes (K, N)."""

    names: list[str]
    wq: np.ndarray  # (K, N) int8, or uint8 with zero points (int16 above 8 bits)
    w_scale: np.ndarray  # (N,) float32, or (groups, N) for group-wise weights
    w_zp: np.ndarray | None  # like w_scale, in the codes' dtype; None when all zero
    act: ActSpec
    act_qparams: tuple[float, int] | None  # static activation (scale, zero point)
    bias: np.ndarray | None = None  # (N,) float32, when folded into the integer op
    group_size: int | None = None  # rows of `wq` per group-wise scale; the last group may be shorter

    @classmethod
    def from_module(cls, name: str, q: QLinear | QConv) -> _Layer:
        n_out = q.weight_q.shape[0]
        wq = q.weight_codes().reshape(n_out, -1).t().contiguous().numpy()  # (K, N), no group padding
        scale, zp = q.weight_scale.float().numpy(), q.weight_zero_point.numpy()
        if q.weight_scheme.granularity == "group":
            scale, zp = scale.reshape(n_out, -1).T, zp.reshape(n_out, -1).T  # (groups, N)
        else:  # per channel, or one value for the tensor
            scale, zp = np.broadcast_to(scale.reshape(-1), (n_out,)), np.broadcast_to(zp.reshape(-1), (n_out,))
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        w_zp = np.ascontiguousarray(zp, dtype=wq.dtype) if zp.any() else None
        group_size = q.weight_scheme.group_size if q.weight_scheme.granularity == "group" else None
        return cls([name], wq, scale, w_zp, q.act, qparams(q), group_size=group_size)

    @property
    def integer_act(self) -> bool:
        """Whether the layer maps onto ORT's 8-bit integer kernels (else: weight-only)."""
        int8 = self.wq.dtype in (np.int8, np.uint8) and self.w_scale.ndim == 1
        return self.act.mode != "none" and self.act.bits == 8 and int8

    @property
    def bias_fusable(self) -> bool:
        """Whether the integer op takes the bias (DynamicQuantizeMatMul, MatMulIntegerToFloat)."""
        return self.integer_act and self.act.granularity == "tensor"

    def spec_key(self) -> tuple[Any, ...]:
        return (self.act, self.act_qparams, self.wq.dtype, self.w_zp is None)


def quantize_graph(
    proto: Any,
    layers: dict[str, QLinear | QConv | QEmbedding],
    *,
    embeddings: Literal["auto", "float", "int8"] = "auto",
    conv: Literal["float", "integer"] = "float",
) -> set[str]:
    """Rewrite `proto` in place: weights equal to a layer's dequantized weight become integer ops.

    Returns the names of the layers found in the graph.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    by_key: dict[bytes, str] = {}
    table_keys = {weight_key(q.dequantized_weight().numpy()): n for n, q in layers.items() if isinstance(q, QEmbedding)}
    for name, q in layers.items():
        if isinstance(q, QEmbedding):
            continue
        w = q.dequantized_weight()
        key = weight_key((w.t() if isinstance(q, QLinear) else w).numpy())  # MatMul: (in, out); Conv: torch's layout
        if key in by_key and layers[by_key[key]].act != q.act:
            raise ExportError(f"layers {by_key[key]} and {name} have identical weights but different activation specs")
        by_key[key] = name

    def layer_at(node: Any, rank: int | None = None) -> str | None:
        t = inits.get(node.input[1]) if len(node.input) > 1 else None
        if t is None or t.data_type != 1 or (rank is not None and len(t.dims) != rank):
            return None
        return by_key.get(weight_key(numpy_helper.to_array(t)))

    b = NodeBuilder(graph)
    matmuls = {i: _Layer.from_module(n, layers[n]) for i, nd in enumerate(graph.node)
               if nd.op_type == "MatMul" and (n := layer_at(nd, rank=2))}  # fmt: skip
    groups = _merge_groups(graph, matmuls)
    bias_adds = _bias_adds(graph, inits, matmuls)
    tables: dict[str, tuple[str, str]] = {}  # float table -> (int8 codes, row scales) initializers

    new_nodes: list[Any] = []
    done: set[str] = set()
    folded: set[int] = set()  # bias Adds taken into an integer op
    for i, node in enumerate(graph.node):
        if i in folded:
            continue
        if i in matmuls:
            if i in groups:  # else: merged into an earlier member of its group
                members = groups[i]
                layer = _concat([matmuls[j] for j in members])
                outs = [graph.node[j].output[0] for j in members]
                if layer.bias_fusable and all(j in bias_adds for j in members):
                    layer.bias = np.concatenate([bias_adds[j][1] for j in members])
                    outs = [graph.node[bias_adds[j][0]].output[0] for j in members]
                    folded.update(bias_adds[j][0] for j in members)
                new_nodes += _lower_matmul(b, node.input[0], outs, layer, [matmuls[j].wq.shape[1] for j in members])
                done.update(layer.names)
        elif node.op_type == "Attention" and (qkv := _attention(node, inits, by_key, layers)):
            new_nodes += _lower_attention(b, node, qkv)
            done.update(qkv.names)
        elif node.op_type == "Conv" and (name := layer_at(node)):
            new_nodes += _lower_conv(
                b, node, _Layer.from_module(name, layers[name]), list(inits[node.input[1]].dims), conv
            )
            done.add(name)
        elif embeddings != "float" and (table := gather_table(inits, node)) is not None:
            owner = table_keys.get(weight_key(table))
            if owner is None and embeddings != "int8":
                new_nodes.append(node)
                continue
            if node.input[0] not in tables:
                q = layers[owner] if owner is not None else None
                tables[node.input[0]] = integer_table(b, table, q)
            new_nodes += lower_gather(b, node, *tables[node.input[0]])
            if owner is not None:
                done.add(owner)
        else:
            new_nodes.append(node)
    replace_nodes(proto, new_nodes)
    log.info("int8 graph: %s", dict(Counter(node.op_type for node in graph.node)))
    return done


def _bias_adds(graph: Any, inits: dict[str, Any], matmuls: dict[int, _Layer]) -> dict[int, tuple[int, np.ndarray]]:
    """MatMul index -> (index, bias) of the Add of a constant (N,) bias that is the MatMul's only consumer."""
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].append(i)
    graph_outputs = {o.name for o in graph.output}
    found = {}
    for i, layer in matmuls.items():
        out = graph.node[i].output[0]
        users = consumers[out]
        if len(users) != 1 or out in graph_outputs or graph.node[users[0]].op_type != "Add":
            continue
        add = graph.node[users[0]]
        t = inits.get(add.input[1] if add.input[0] == out else add.input[0])
        if t is not None and t.data_type == 1 and list(t.dims) == [layer.wq.shape[1]]:
            found[i] = (users[0], numpy_helper.to_array(t))
    return found


def _merge_groups(graph: Any, matmuls: dict[int, _Layer]) -> dict[int, list[int]]:
    """First node index -> indices of integer MatMuls that read the same input with the same quantization."""
    by_input: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, layer in matmuls.items():
        key = (graph.node[i].input[0], layer.wq.shape[0], layer.spec_key()) if layer.integer_act else (i,)
        by_input[key].append(i)
    return {members[0]: members for members in by_input.values()}


def _concat(layers: list[_Layer]) -> _Layer:
    """Layers side by side along N (they share K, the input and its quantization)."""
    if len(layers) == 1:
        return layers[0]
    first = layers[0]
    w_zp = None if first.w_zp is None else np.concatenate([x.w_zp for x in layers], axis=-1)  # type: ignore[misc]
    return _Layer(
        [n for x in layers for n in x.names],
        np.concatenate([x.wq for x in layers], axis=1),
        np.concatenate([x.w_scale for x in layers], axis=-1),
        w_zp,
        first.act,
        first.act_qparams,
    )


def _static_u8(layer: _Layer) -> tuple[np.float32, np.ndarray]:
    """The static activation scale and zero point, as uint8 (signed codes shift by 128: exact)."""
    assert layer.act_qparams is not None
    scale, zp = layer.act_qparams
    return np.float32(scale), np.array(zp + (128 if layer.act.symmetric else 0), dtype=np.uint8)


def _lower_matmul(b: NodeBuilder, x: str, outs: list[str], layer: _Layer, widths: list[int]) -> list[Any]:
    """Nodes computing `x @ W (+ bias)` for `layer` into `outs` (split into `widths` for merged layers)."""
    wq, ws = b.const("w", layer.wq), b.const("w_scale", layer.w_scale)
    wz = [b.const("w_zp", layer.w_zp)] if layer.w_zp is not None else []
    bias = [b.const("bias", layer.bias.astype(np.float32))] if layer.bias is not None else []
    wz_slot = wz or ([""] if bias else [])  # optional inputs before the bias
    act = layer.act
    nodes: list[Any]
    if not layer.integer_act:
        if act.mode != "none":
            warnings.warn(
                f"{', '.join(layer.names)}: no ORT integer kernel; int8 weights, float compute",
                ExportWarning,
                stacklevel=2,
            )
        nodes = _dequant_weight(b, wq, ws, wz, layer.wq.shape, layer.group_size)
        nodes.append(b.node("MatMul", [x, nodes[-1].output[0]]))
    elif act.mode == "dynamic" and act.granularity == "tensor" and not act.symmetric:
        nodes = [b.node("DynamicQuantizeMatMul", [x, wq, ws, *wz_slot, *bias], domain=MS_DOMAIN)]
    elif act.mode == "static":
        scale, zp = _static_u8(layer)
        a_scale, a_zp = b.const("a_scale", scale), b.const("a_zp", zp)
        quant = b.node("QuantizeLinear", [x, a_scale, a_zp])
        mm = b.node("MatMulIntegerToFloat", [quant.output[0], wq, a_scale, ws, a_zp, *wz_slot, *bias], domain=MS_DOMAIN)
        nodes = [quant, mm]
    elif act.granularity == "tensor":  # dynamic symmetric: max|x| / 127, codes shifted to uint8
        nodes, (xq, scale, zp128) = _quantize_symmetric(b, x)
        mm_in = [xq, wq, scale, ws, zp128, *wz_slot, *bias]
        nodes.append(b.node("MatMulIntegerToFloat", mm_in, domain=MS_DOMAIN))
    else:
        nodes = _dynamic_per_token(b, x, wq, ws, wz, layer)
    y = outs[0] if len(outs) == 1 else b.name("merged")
    nodes[-1].output[0] = y
    if len(outs) > 1:
        split = b.node("Split", [y, b.const("split", np.array(widths, dtype=np.int64))], n_out=len(outs), axis=-1)
        split.output[:] = outs
        nodes.append(split)
    return nodes


def _quantize_symmetric(b: NodeBuilder, x: str) -> tuple[list[Any], tuple[str, str, str]]:
    """Nodes quantizing `x` per tensor at run time with scale max|x| / 127 (codes shifted to uint8 by 128)."""
    absx = b.node("Abs", [x])
    absmax = b.node("ReduceMax", [absx.output[0]], keepdims=0)
    div = b.node("Div", [absmax.output[0], b.const("qmax", np.float32(127))])
    scale = b.node("Max", [div.output[0], b.const("tiny", _TINY)])
    zp128 = b.const("a_zp", np.array(128, dtype=np.uint8))
    quant = b.node("QuantizeLinear", [x, scale.output[0], zp128])
    return [absx, absmax, div, scale, quant], (quant.output[0], scale.output[0], zp128)


def _dequant_weight(
    b: NodeBuilder, wq: str, ws: str, wz: list[str], shape: tuple[int, ...], group_size: int | None = None
) -> list[Any]:
    """The float weight from its integer codes; ORT folds these constant nodes once, at session load.

    Group-wise scales (groups, N) apply to (groups, group_size, N) blocks of the (K, N) codes. A short
    last group (K % group_size rows) is padded with zero rows while dequantizing and cut off after.
    """
    scale_dims = next(t.dims for t in reversed(b.graph.initializer) if t.name == ws)
    grouped = len(scale_dims) == 2 and len(shape) == 2
    nodes = [b.node("Cast", [wq], to=1)]
    if grouped:
        gs = group_size or shape[0] // scale_dims[0]
        pad = scale_dims[0] * gs - shape[0]
        if pad:
            pads = b.const("pads", np.array([0, 0, pad, 0], dtype=np.int64))
            nodes.append(b.node("Pad", [nodes[-1].output[0], pads]))  # (groups * group_size, N)
        blocks = np.array([scale_dims[0], gs, shape[1]], dtype=np.int64)
        nodes.append(b.node("Reshape", [nodes[-1].output[0], b.const("blocks", blocks)]))  # (groups, gs, N)
        ws = _unsqueezed(b, nodes, ws)
        wz = [_unsqueezed(b, nodes, z) for z in wz]
    if wz:
        zp = b.node("Cast", wz, to=1)
        nodes += [zp, b.node("Sub", [nodes[-1].output[0], zp.output[0]])]
    nodes.append(b.node("Mul", [nodes[-1].output[0], ws]))
    if grouped:
        rows = np.array([scale_dims[0] * gs, shape[1]], dtype=np.int64)
        nodes.append(b.node("Reshape", [nodes[-1].output[0], b.const("shape", rows)]))  # (groups * gs, N)
        if pad:
            starts, ends = b.const("start", np.array([0])), b.const("end", np.array([shape[0]]))
            nodes.append(b.node("Slice", [nodes[-1].output[0], starts, ends, b.const("axes", np.array([0]))]))
    return nodes


def _unsqueezed(b: NodeBuilder, nodes: list[Any], name: str) -> str:
    """(groups, N) -> (groups, 1, N), appended to `nodes` before the nodes that use it."""
    node = b.node("Unsqueeze", [name, b.const("ax", np.array([1]))])
    nodes.insert(0, node)
    return node.output[0]


def _dynamic_per_token(b: NodeBuilder, x: str, wq: str, ws: str, wz: list[str], layer: _Layer) -> list[Any]:
    """One scale (and zero point) per row of `x`, computed at run time, as `QLinear`'s per-token mode.

    The rows are quantized by a per-axis QuantizeLinear on the (rows, K) view and multiplied by
    MatMulInteger; y = (acc - zp_row * colsum(W)) * scale_row * w_scale. Symmetric codes are shifted to
    uint8 with one zero point (128) for every row, so no correction is needed.
    """
    k, n = layer.wq.shape
    nodes: list[Any] = []

    def add(op: str, inputs: list[str], **attrs: Any) -> str:
        nodes.append(b.node(op, inputs, **attrs))
        return nodes[-1].output[0]

    rows = add("Reshape", [x, b.const("rows", np.array([-1, k]))])  # (M, K)
    zero, tiny = b.const("zero", np.float32(0)), b.const("tiny", _TINY)
    if layer.act.symmetric:
        absmax = add("ReduceMax", [add("Abs", [rows])], axes=[1], keepdims=0)  # (M,)
        scale = add("Max", [add("Div", [absmax, b.const("qmax", np.float32(127))]), tiny])
        zp128 = b.const("a_zp", np.array(128, np.uint8))
        codes = add("QuantizeLinear", [rows, scale, add("Expand", [zp128, add("Shape", [scale])])], axis=0)
        acc = add("Cast", [add("MatMulInteger", [codes, wq, zp128, *wz])], to=1)  # (M, N)
    else:
        lo = add("Min", [add("ReduceMin", [rows], axes=[1], keepdims=0), zero])  # (M,)
        hi = add("Max", [add("ReduceMax", [rows], axes=[1], keepdims=0), zero])
        scale = add("Max", [add("Div", [add("Sub", [hi, lo]), b.const("qrange", np.float32(255))]), tiny])
        zp = add(
            "Clip", [add("Round", [add("Div", [add("Neg", [lo]), scale])]), zero, b.const("q255", np.float32(255))]
        )
        codes = add("QuantizeLinear", [rows, scale, add("Cast", [zp], to=2)], axis=0)  # uint8 (M, K)
        acc = add("Cast", [add("MatMulInteger", [codes, wq, b.const("a_zp", np.array(0, np.uint8)), *wz])], to=1)
        w_int = layer.wq.astype(np.int64) - (0 if layer.w_zp is None else layer.w_zp.astype(np.int64))
        colsum = b.const("colsum", w_int.sum(0, keepdims=True).astype(np.float32))  # (1, N)
        acc = add("Sub", [acc, add("Mul", [add("Unsqueeze", [zp, b.const("ax", np.array([1]))]), colsum])])
    y = add("Mul", [add("Mul", [acc, add("Unsqueeze", [scale, b.const("ax", np.array([1]))])]), ws])
    lead = add("Slice", [add("Shape", [x]), b.const("s0", np.array([0])), b.const("s1", np.array([-1]))])
    add("Reshape", [y, add("Concat", [lead, b.const("n", np.array([n]))], axis=0)])  # (..., N)
    return nodes


def _attention(node: Any, inits: dict[str, Any], by_key: dict[bytes, str], layers: dict[str, Any]) -> _Layer | None:
    """The Q, K, V layers packed in a fused Attention's weight (hidden, 3 * hidden), if all three are ours."""
    t = inits.get(node.input[1]) if node.domain == MS_DOMAIN else None
    if t is None:
        return None
    names = [n for part in np.split(numpy_helper.to_array(t), 3, axis=1) if (n := by_key.get(weight_key(part)))]
    return _concat([_Layer.from_module(n, layers[n]) for n in names]) if len(names) == 3 else None


def _lower_attention(b: NodeBuilder, node: Any, qkv: _Layer) -> list[Any]:
    """Attention -> QAttention (one input scale, per-column weight scales), else int8 weights, float compute."""
    wq, ws = b.const("w", qkv.wq), b.const("w_scale", qkv.w_scale)
    wz = [b.const("w_zp", qkv.w_zp)] if qkv.w_zp is not None else []
    inputs = list(node.input) + [""] * (4 - len(node.input))  # input, weight, bias, mask_index
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    act = qkv.act
    if not qkv.integer_act or act.granularity != "tensor" or (act.mode == "dynamic" and act.symmetric):
        if act.mode != "none":
            warnings.warn(
                f"{', '.join(qkv.names)}: no QAttention form for {act}; int8 weights, float attention", stacklevel=2
            )
        deq = _dequant_weight(b, wq, ws, wz, qkv.wq.shape)
        fused = helper.make_node("Attention", [inputs[0], deq[-1].output[0], *inputs[2:]], list(node.output),
                                 domain=MS_DOMAIN, name=node.name, **attrs)  # fmt: skip
        return [*deq, fused]
    if act.mode == "dynamic":
        quant = b.node("DynamicQuantizeLinear", [inputs[0]], n_out=3)
        x_q, x_scale, x_zp = quant.output
    else:
        scale, zp = _static_u8(qkv)
        x_scale, x_zp = b.const("a_scale", scale), b.const("a_zp", zp)
        quant = b.node("QuantizeLinear", [inputs[0], x_scale, x_zp])
        x_q = quant.output[0]
    q_inputs = [x_q, wq, inputs[2], x_scale, ws, inputs[3], x_zp, *wz]
    return [
        quant,
        helper.make_node("QAttention", q_inputs, list(node.output), domain=MS_DOMAIN, name=node.name, **attrs),
    ]


def _lower_conv(b: NodeBuilder, node: Any, layer: _Layer, weight_dims: list[int], mode: str) -> list[Any]:
    """Conv as ConvInteger on uint8 activations (static or dynamic per-tensor scale) and int8 weights.

    The int32 accumulator is scaled by activation scale x per-channel weight scale and the bias added
    in float. Weight-only convolutions keep float compute on weights dequantized at session load.
    """
    if layer.wq.dtype not in (np.int8, np.uint8):
        raise ExportError(f"{layer.names}: only convolution weights of up to 8 bits export as int8")
    n_out = weight_dims[0]
    per_channel = [n_out] + [1] * (len(weight_dims) - 1)
    wq = b.const("w", np.ascontiguousarray(layer.wq.T).reshape(weight_dims))
    ws_values = layer.w_scale.reshape(per_channel)
    wz = [b.const("w_zp", layer.w_zp.reshape(-1))] if layer.w_zp is not None else []
    act = layer.act
    if mode == "float" or act.mode == "none" or act.bits != 8 or act.granularity != "tensor":
        if act.mode != "none":
            why = "ORT's ConvInteger is slower than float Conv" if mode == "float" else "no ORT integer kernel"
            warnings.warn(
                f"{', '.join(layer.names)}: int8 weights, float compute in ONNX ({why})", ExportWarning, stacklevel=2
            )
        zp = [b.const("w_zp", layer.w_zp.reshape(per_channel))] if layer.w_zp is not None else []
        deq = _dequant_weight(b, wq, b.const("w_scale", ws_values), zp, tuple(weight_dims))
        conv = type(node)()
        conv.CopyFrom(node)
        conv.input[1] = deq[-1].output[0]
        return [*deq, conv]
    x = node.input[0]
    bias_dims = [1, n_out] + [1] * (len(weight_dims) - 2)  # broadcast over (B, C_out, *spatial)
    if act.mode == "static":
        scale_value, zp = _static_u8(layer)
        a_scale, a_zp = b.const("a_scale", scale_value), b.const("a_zp", zp)
        quant = b.node("QuantizeLinear", [x, a_scale, a_zp])
        nodes, xq = [quant], quant.output[0]
    elif act.symmetric:
        nodes, (xq, a_scale, a_zp) = _quantize_symmetric(b, x)
    else:
        dq = b.node("DynamicQuantizeLinear", [x], n_out=3)
        nodes, (xq, a_scale, a_zp) = [dq], tuple(dq.output)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nodes.append(b.node("ConvInteger", [xq, wq, a_zp, *wz], **attrs))
    nodes.append(b.node("Cast", [nodes[-1].output[0]], to=1))
    # (1, C_out, 1[, 1]): the activation scale times each output channel's weight scale
    out_scale = b.node("Mul", [a_scale, b.const("w_scale", ws_values.reshape(bias_dims))])
    nodes += [out_scale, b.node("Mul", [nodes[-1].output[0], out_scale.output[0]])]
    if len(node.input) > 2 and node.input[2]:
        bias_shape = b.const("bias_shape", np.array(bias_dims, dtype=np.int64))
        bias = b.node("Reshape", [node.input[2], bias_shape])
        nodes += [bias, b.node("Add", [nodes[-1].output[0], bias.output[0]])]
    nodes[-1].output[0] = node.output[0]
    return nodes
