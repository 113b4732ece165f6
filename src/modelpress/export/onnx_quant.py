"""Integer ONNX from a quantized model: our QLinear parameters mapped onto ONNX Runtime's int8 operators.

The float graph is exported first, with each `QLinear` standing in as `x @ W_hat + b` where `W_hat`
is its dequantized weight. Every MatMul whose weight initializer holds exactly some layer's `W_hat`
(matched by value, so the mapping survives renaming and ORT's QKV packing) is then rewritten
with that layer's own integers and scales; nothing is re-quantized here:

- weights: the layer's int8 (or uint8 + zero point) values, per channel or per tensor, stored as int8
  initializers, so the file shrinks to about a quarter;
- activations, per the layer's `ActSpec`: dynamic per tensor -> `DynamicQuantizeMatMul`; static ->
  `QuantizeLinear` + `MatMulIntegerToFloat` with the calibrated scale; dynamic per token -> a per-row
  `QuantizeLinear` + `MatMulInteger`, rescaled per row and column (what ORT's fused ops cannot
  express); none (weight-only) -> int8 weights dequantized once when the session loads;
- projections that read the same input with the same activation spec (attention's Q, K, V) become one
  integer MatMul and a Split, so the input is quantized once; ORT's fused `Attention` (after its BERT
  optimizer) becomes `QAttention`;
- `embeddings="int8"`: large Gather tables (word and position embeddings) are stored int8 with one
  scale per row, dequantized after the gather. This is an export-time weight-only choice of ours (the
  eager model keeps float tables); per-row scales cost no measurable quality on MiniLM.

    >>> export_quantized_onnx(qmodel, entry.example_inputs(1), "out/model.onnx")
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.export.onnx import DynamicAxes, ExportError, _as_tuple, export_float, optimize_graph
from modelpress.quant.modules import ActSpec, QConv, QLinear

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
MIN_EMBEDDING_SIZE = 1 << 16  # Gather tables with fewer values stay float (token-type embeddings, ...)


def has_quantized_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (QLinear, QConv)) for m in model.modules())


def export_quantized_onnx(
    model: nn.Module,
    example_inputs: Any,
    out_path: str | Path,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: bool | DynamicAxes = True,
    opset: int = 17,
    optimize: bool = False,
    embeddings: Literal["float", "int8"] = "int8",
    merge_projections: bool = True,
    fuse_attention: bool = True,
) -> Path:
    """Export `model` (holding `QLinear` layers) as an integer ONNX model, written atomically.

    `optimize` first applies ORT's transformer optimizer (fused Attention -> `QAttention`) or
    extended graph optimizations to the float graph; measured on MiniLM it is slower than the plain
    graph with merged projections, hence off by default.
    """
    import onnx

    inputs = _as_tuple(example_inputs)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QLinear, QConv))}
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        export_float(model, inputs, tmp, input_names, output_names, dynamic_axes, opset, _swap_in_float, fuse_attention)
        if optimize:
            optimize_graph(tmp, model, inputs, embed_layer_norm=embeddings == "float")
        proto = onnx.load(str(tmp))
        stats = quantize_graph(proto, layers, embeddings=embeddings, merge_projections=merge_projections)
        missing = sorted(set(layers) - stats.layers)
        if missing:
            raise ExportError(f"no ONNX MatMul/Conv carries the weights of {missing[:5]}; cannot export them as int8")
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    log.info("int8 export: %s", stats)
    return out_path


# ---------------------------------------------------------------- float stand-ins


class _DequantLinear(nn.Module):
    """`x @ W_hat + b`, exported as MatMul + Add with `W_hat` (in, out) as the MatMul's initializer."""

    def __init__(self, q: QLinear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(q.dequantized_weight().t().contiguous(), requires_grad=False)
        self.bias = None if q.bias is None else nn.Parameter(q.bias.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _dequant_conv(q: QConv) -> nn.Module:
    conv_type = nn.Conv1d if q.dims == 1 else nn.Conv2d
    w = q.dequantized_weight()
    conv = conv_type(q.in_channels, q.out_channels, tuple(w.shape[2:]), q.stride, q.padding, q.dilation, q.groups,
                     bias=q.bias is not None)  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(w)
        if q.bias is not None:
            conv.bias.copy_(q.bias)
    return conv


def _swap_in_float(model: nn.Module) -> None:
    """Replace quantized layers by float stand-ins; mark attentions whose Q/K/V cannot become one QAttention."""
    for module in model.modules():
        projections = [getattr(module, n, None) for n in ("query", "key", "value")]
        quantized = [isinstance(p, QLinear) for p in projections]
        if any(quantized) and not (all(quantized) and _qattention_ready(projections)):  # type: ignore[arg-type]
            module.no_fuse = True  # read by export.onnx._fusable_attention
    for name, module in list(model.named_modules()):
        if isinstance(module, (QLinear, QConv)):
            parent, _, child = name.rpartition(".")
            stand_in = _DequantLinear(module) if isinstance(module, QLinear) else _dequant_conv(module)
            setattr(model.get_submodule(parent) if parent else model, child, stand_in)


def _qattention_ready(layers: list[QLinear]) -> bool:
    """Q, K, V with one input quantization that QAttention takes (per tensor; weight-only also fuses)."""
    specs = {(q.act, None if q.act_scale is None else float(q.act_scale)) for q in layers}
    act = layers[0].act
    per_tensor = act.granularity == "tensor" and act.bits == 8 and not (act.mode == "dynamic" and act.symmetric)
    return len(specs) == 1 and (act.mode == "none" or per_tensor)


# ---------------------------------------------------------------- graph rewrite


@dataclass
class RewriteStats:
    layers: set[str]
    ops: dict[str, int]

    def __str__(self) -> str:
        return f"{len(self.layers)} layers; " + ", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items()))


@dataclass
class _Layer:
    """One quantized layer (or several merged along N) in ONNX layout: weight (K, N)."""

    names: list[str]
    wq: np.ndarray  # (K, N) int8, or uint8 with a zero point
    w_scale: np.ndarray  # (N,) float32
    w_zp: np.ndarray | None  # (N,) same dtype as wq; None when all zero
    act: ActSpec
    act_scale: float | None
    act_zp: int | None
    bias: np.ndarray | None = None  # (N,) float32, when folded into the integer op

    @classmethod
    def from_module(cls, name: str, q: QLinear | QConv) -> _Layer:
        n_out = q.weight_q.shape[0]
        wq = q.weight_q.reshape(n_out, -1).t().contiguous().numpy()  # (K, N)
        scale = np.broadcast_to(q.weight_scale.reshape(-1).float().numpy(), (n_out,)).astype(np.float32)
        zp = np.broadcast_to(q.weight_zero_point.reshape(-1).numpy(), (n_out,))
        w_zp = None if not zp.any() else zp.astype(wq.dtype)
        act_scale = None if q.act_scale is None else float(q.act_scale)
        act_zp = None if q.act_zero_point is None else int(q.act_zero_point)
        return cls([name], wq, np.ascontiguousarray(scale), w_zp, q.act, act_scale, act_zp)

    @property
    def integer_act(self) -> bool:
        """Whether the activation maps onto ORT's 8-bit integer kernels (else: weight-only)."""
        return self.act.mode != "none" and self.act.bits == 8 and self.wq.dtype in (np.int8, np.uint8)

    @property
    def bias_fusable(self) -> bool:
        """Whether the integer op takes the bias (DynamicQuantizeMatMul, MatMulIntegerToFloat)."""
        return self.integer_act and self.act.granularity == "tensor"

    def spec_key(self) -> tuple[Any, ...]:
        return (self.act, self.act_scale, self.act_zp, self.wq.dtype, self.w_zp is None)


def _key(array: np.ndarray) -> bytes:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(a.tobytes()).digest() + str(a.shape).encode()


def quantize_graph(
    proto: Any,
    layers: dict[str, QLinear | QConv],
    *,
    embeddings: Literal["float", "int8"] = "int8",
    merge_projections: bool = True,
) -> RewriteStats:
    """Rewrite `proto` in place: MatMul/Conv/Attention weights that equal a layer's dequantized weight become integer ops."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    by_key: dict[bytes, str] = {}
    for name, q in layers.items():
        w = q.dequantized_weight()
        w = w.t() if isinstance(q, QLinear) else w  # MatMul holds (in, out); Conv holds the torch layout
        key = _key(w.numpy())
        if key in by_key and layers[by_key[key]].act != q.act:
            raise ExportError(f"layers {by_key[key]} and {name} have identical weights but different activation specs")
        by_key[key] = name

    def layer_of(init_name: str) -> str | None:
        t = inits.get(init_name)
        if t is None or t.data_type != 1 or len(t.dims) != 2:
            return None
        return by_key.get(_key(numpy_helper.to_array(t)))

    b = _Builder(graph)
    matmuls: dict[int, _Layer] = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "MatMul" and (name := layer_of(node.input[1])):
            matmuls[i] = _Layer.from_module(name, layers[name])
    groups = _merge_groups(graph, matmuls) if merge_projections else {i: [i] for i in matmuls}
    bias_adds = _bias_adds(graph, inits, matmuls)

    new_nodes: list[Any] = []
    done: set[str] = set()
    folded: set[int] = set()  # bias Adds taken into the integer op
    for i, node in enumerate(graph.node):
        if i in folded:
            continue
        if i in matmuls:
            if i in groups:
                members = groups[i]
                merged = _concat([matmuls[j] for j in members])
                outs = [graph.node[j].output[0] for j in members]
                if merged.bias_fusable and all(j in bias_adds for j in members):
                    merged.bias = np.concatenate([bias_adds[j][1] for j in members])
                    outs = [graph.node[bias_adds[j][0]].output[0] for j in members]
                    folded.update(bias_adds[j][0] for j in members)
                widths = [matmuls[j].wq.shape[1] for j in members]
                new_nodes += _lower_matmul(b, node.input[0], outs, merged, widths)
                done.update(merged.names)
            continue  # merged into an earlier node of its group
        if node.op_type == "Attention" and node.domain == MS_DOMAIN and (qkv := _attention_layers(node, inits, by_key, layers)):
            new_nodes += _lower_attention(b, node, qkv)
            done.update(qkv.names)
        elif node.op_type == "Conv" and len(node.input) > 1 and (name := _conv_layer(node, inits, by_key)):
            new_nodes += _lower_conv(b, node, _Layer.from_module(name, layers[name]), list(inits[node.input[1]].dims))
            done.add(name)
        elif embeddings == "int8" and node.op_type == "Gather" and _is_table(inits.get(node.input[0])):
            new_nodes += _lower_gather(b, node, numpy_helper.to_array(inits[node.input[0]]))
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(_opset(MS_DOMAIN, 1))
    ops: dict[str, int] = defaultdict(int)
    for node in graph.node:
        ops[node.op_type] += 1
    return RewriteStats(done, dict(ops))


def _bias_adds(graph: Any, inits: dict[str, Any], matmuls: dict[int, _Layer]) -> dict[int, tuple[int, np.ndarray]]:
    """MatMul index -> (index, bias) of the Add of a constant (N,) bias that is the MatMul's only consumer."""
    from onnx import numpy_helper

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
    """First node index -> node indices of quantized MatMuls that share an input and an activation spec."""
    by_input: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, layer in matmuls.items():
        mergeable = layer.integer_act  # static layers merge only with equal input qparams (spec_key)
        key = (graph.node[i].input[0], layer.wq.shape[0], layer.spec_key()) if mergeable else (i,)
        by_input[key].append(i)
    return {members[0]: members for members in by_input.values()}


def _concat(layers: list[_Layer]) -> _Layer:
    if len(layers) == 1:
        return layers[0]
    first = layers[0]
    w_zp = None if first.w_zp is None else np.concatenate([x.w_zp for x in layers])  # type: ignore[misc]
    return _Layer(
        [n for x in layers for n in x.names],
        np.concatenate([x.wq for x in layers], axis=1),
        np.concatenate([x.w_scale for x in layers]),
        w_zp,
        first.act,
        first.act_scale,
        first.act_zp,
    )


class _Builder:
    """Unique names, new initializers and nodes for the rewrite."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"mp_q{self.count}_{stem}"

    def const(self, stem: str, value: Any) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> Any:
        from onnx import helper

        outs = [self.name(op.lower()) for _ in range(n_out)]
        return helper.make_node(op, inputs, outs, domain=domain or None, **attrs)


def _u8(layer: _Layer) -> tuple[float, np.ndarray]:
    """The static activation scale and its zero point as uint8 (a signed range is shifted by 128: exact)."""
    assert layer.act_scale is not None and layer.act_zp is not None
    zp = layer.act_zp + (128 if layer.act.symmetric else 0)
    return layer.act_scale, np.array(zp, dtype=np.uint8)


def _lower_matmul(b: _Builder, x: str, outs: list[str], layer: _Layer, widths: list[int]) -> list[Any]:
    """Nodes computing `x @ W` for `layer` into `outs` (split along N into `widths` for merged layers)."""
    y = outs[0] if len(outs) == 1 else b.name("merged")
    wq = b.const("w", layer.wq)
    ws = b.const("w_scale", layer.w_scale)
    wz = [b.const("w_zp", layer.w_zp)] if layer.w_zp is not None else []
    bias = [b.const("bias", layer.bias.astype(np.float32))] if layer.bias is not None else []
    act = layer.act
    nodes: list[Any]
    if not layer.integer_act:
        if act.mode != "none":
            log.warning("%s: %d-bit activations have no ORT integer kernel; exported weight-only", layer.names, act.bits)
        nodes = _dequant_weight(b, wq, ws, wz, layer)
        nodes.append(b.node("MatMul", [x, nodes[-1].output[0]]))
    elif act.mode == "dynamic" and act.granularity == "tensor" and not act.symmetric:
        wz_or_empty = wz or ([""] if bias else [])
        nodes = [b.node("DynamicQuantizeMatMul", [x, wq, ws, *wz_or_empty, *bias], domain=MS_DOMAIN)]
    elif act.mode == "static":
        scale, zp = _u8(layer)
        a_scale, a_zp = b.const("a_scale", np.float32(scale)), b.const("a_zp", zp)
        quant = b.node("QuantizeLinear", [x, a_scale, a_zp])
        w_zp = wz or ([""] if bias else [])
        mm = b.node("MatMulIntegerToFloat", [quant.output[0], wq, a_scale, ws, a_zp, *w_zp, *bias], domain=MS_DOMAIN)
        nodes = [quant, mm]
    elif act.granularity == "tensor":  # dynamic, symmetric
        nodes = _dynamic_symmetric_tensor(b, x, wq, ws, wz, bias)
    else:
        nodes = _dynamic_per_token(b, x, wq, ws, wz, layer)
    nodes[-1].output[0] = y
    if len(outs) > 1:
        sizes = b.const("split", np.array(widths, dtype=np.int64))
        nodes.append(b.node("Split", [y, sizes], n_out=len(outs), axis=-1))
        nodes[-1].output[:] = outs
    return nodes


def _dequant_weight(b: _Builder, wq: str, ws: str, wz: list[str], layer: _Layer) -> list[Any]:
    """Float weight from the int8 initializer; ORT folds these constants once when the session loads."""
    cast = b.node("Cast", [wq], to=1)
    nodes = [cast]
    if wz:
        zp = b.node("Cast", wz, to=1)
        nodes += [zp, b.node("Sub", [cast.output[0], zp.output[0]])]
    nodes.append(b.node("Mul", [nodes[-1].output[0], ws]))
    return nodes


def _dynamic_symmetric_tensor(b: _Builder, x: str, wq: str, ws: str, wz: list[str], bias: list[str]) -> list[Any]:
    """scale = max|x| / 127 over the whole tensor; int8 codes shifted to uint8 (zero point 128)."""
    absx = b.node("Abs", [x])
    amax = b.node("ReduceMax", [absx.output[0]], keepdims=0)
    scale = b.node("Div", [amax.output[0], b.const("qmax", np.float32(127))])
    safe = _nonzero(b, scale.output[0])
    zp = b.const("a_zp", np.array(128, dtype=np.uint8))
    quant = b.node("QuantizeLinear", [x, safe[-1].output[0], zp])
    w_zp = wz or ([""] if bias else [])
    mm = b.node("MatMulIntegerToFloat", [quant.output[0], wq, safe[-1].output[0], ws, zp, *w_zp, *bias], domain=MS_DOMAIN)
    return [absx, amax, scale, *safe, quant, mm]


def _nonzero(b: _Builder, scale: str) -> list[Any]:
    """Scale 0 (an all-zero input) becomes 1, as in `qparams_from_range`."""
    is_zero = b.node("Equal", [scale, b.const("zero", np.float32(0))])
    return [is_zero, b.node("Where", [is_zero.output[0], b.const("one", np.float32(1)), scale])]


def _dynamic_per_token(b: _Builder, x: str, wq: str, ws: str, wz: list[str], layer: _Layer) -> list[Any]:
    """One scale (and zero point) per row of `x`, computed at run time, as `QLinear`'s per-token mode.

    ORT's fused kernels take one activation scale per tensor, so the rows are quantized with a per-axis
    QuantizeLinear on the (rows, K) view, multiplied by MatMulInteger, and rescaled per row and column:
    y = (acc - zp_row * colsum(Wq)) * scale_row * w_scale.
    """
    k, n = layer.wq.shape
    nodes: list[Any] = []

    def add(op: str, inputs: list[str], **attrs: Any) -> str:
        nodes.append(b.node(op, inputs, **attrs))
        return nodes[-1].output[0]

    shape = add("Shape", [x])
    lead = add("Slice", [shape, b.const("s0", np.array([0])), b.const("s1", np.array([-1]))])
    out_shape = add("Concat", [lead, b.const("n", np.array([n]))], axis=0)
    rows = add("Reshape", [x, b.const("rows", np.array([-1, k]))])  # (M, K)
    zero = b.const("zero", np.float32(0))
    if layer.act.symmetric:
        amax = add("ReduceMax", [add("Abs", [rows])], axes=[1], keepdims=0)  # (M,)
        raw = add("Div", [amax, b.const("qmax", np.float32(127))])
        scale = add("Where", [add("Equal", [raw, zero]), b.const("one", np.float32(1)), raw])
        # signed codes shifted to uint8 with one zero point (128) for all rows: the u8s8 kernel, exact
        zp128 = b.const("a_zp", np.array(128, np.uint8))
        codes = add("QuantizeLinear", [rows, scale, add("Expand", [zp128, add("Shape", [scale])])], axis=0)
        acc = add("Cast", [add("MatMulInteger", [codes, wq, zp128, *wz])], to=1)
    else:
        lo = add("Min", [add("ReduceMin", [rows], axes=[1], keepdims=0), zero])
        hi = add("Max", [add("ReduceMax", [rows], axes=[1], keepdims=0), zero])
        raw = add("Div", [add("Sub", [hi, lo]), b.const("qrange", np.float32(255))])
        scale = add("Where", [add("Equal", [raw, zero]), b.const("one", np.float32(1)), raw])
        zp_f = add("Clip", [add("Round", [add("Div", [add("Neg", [lo]), scale])]), zero, b.const("q255", np.float32(255))])
        codes = add("QuantizeLinear", [rows, scale, add("Cast", [zp_f], to=2)], axis=0)  # uint8 (M, K)
        acc = add("Cast", [add("MatMulInteger", [codes, wq, b.const("a_zp", np.array(0, np.uint8)), *wz])], to=1)
        w_int = layer.wq.astype(np.int64) - (0 if layer.w_zp is None else layer.w_zp.astype(np.int64))
        colsum = b.const("colsum", w_int.sum(0, keepdims=True).astype(np.float32))  # (1, N)
        correction = add("Mul", [add("Unsqueeze", [zp_f, b.const("ax", np.array([1]))]), colsum])
        acc = add("Sub", [acc, correction])
    row_scale = add("Unsqueeze", [scale, b.const("ax", np.array([1]))])  # (M, 1)
    y = add("Mul", [add("Mul", [acc, row_scale]), ws])
    add("Reshape", [y, out_shape])
    return nodes


def _attention_layers(node: Any, inits: dict[str, Any], by_key: dict[bytes, str], layers: dict[str, Any]) -> _Layer | None:
    """The Q, K, V layers packed in a fused Attention's weight (in, 3 * hidden), if all three are ours."""
    from onnx import numpy_helper

    t = inits.get(node.input[1])
    if t is None:
        return None
    w = numpy_helper.to_array(t)
    names = [by_key.get(_key(part)) for part in np.split(w, 3, axis=1)]
    if any(n is None for n in names):
        return None
    merged = _concat([_Layer.from_module(n, layers[n]) for n in names])  # type: ignore[index]
    return merged


def _lower_attention(b: _Builder, node: Any, qkv: _Layer) -> list[Any]:
    """Attention -> QAttention (per-tensor input scale, per-column weight scales), else int8 weights dequantized."""
    from onnx import helper

    wq, ws = b.const("w", qkv.wq), b.const("w_scale", qkv.w_scale)
    wz = [b.const("w_zp", qkv.w_zp)] if qkv.w_zp is not None else []
    inputs = list(node.input) + [""] * (4 - len(node.input))
    act = qkv.act
    if not qkv.integer_act or act.granularity != "tensor" or (act.mode == "dynamic" and act.symmetric):
        log.warning("%s: activation spec %s has no QAttention form; exported weight-only", qkv.names, act)
        deq = _dequant_weight(b, wq, ws, wz, qkv)
        return [*deq, helper.make_node("Attention", [inputs[0], deq[-1].output[0], *inputs[2:]], list(node.output),
                                       domain=MS_DOMAIN, name=node.name, **_attrs(node))]  # fmt: skip
    if act.mode == "dynamic":
        quant = b.node("DynamicQuantizeLinear", [inputs[0]], n_out=3)
        x_q, x_scale, x_zp = quant.output
    else:
        scale, zp = _u8(qkv)
        x_scale, x_zp = b.const("a_scale", np.float32(scale)), b.const("a_zp", zp)
        quant = b.node("QuantizeLinear", [inputs[0], x_scale, x_zp])
        x_q = quant.output[0]
    mask = inputs[3]
    q_inputs = [x_q, wq, inputs[2], x_scale, ws, mask, x_zp, *(wz or [])]
    qattn = helper.make_node("QAttention", q_inputs, list(node.output), domain=MS_DOMAIN, name=node.name, **_attrs(node))
    return [quant, qattn]


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv_layer(node: Any, inits: dict[str, Any], by_key: dict[bytes, str]) -> str | None:
    from onnx import numpy_helper

    t = inits.get(node.input[1])
    return None if t is None or t.data_type != 1 else by_key.get(_key(numpy_helper.to_array(t)))


def _lower_conv(b: _Builder, node: Any, layer: _Layer, weight_dims: list[int]) -> list[Any]:
    """Conv with int8 weights dequantized at load (activation quantization of convolutions is not exported)."""
    if layer.act.mode != "none":
        log.warning("%s: conv activations are not quantized in ONNX; int8 weights, float compute", layer.names)
    if layer.wq.dtype not in (np.int8, np.uint8):
        raise ExportError(f"{layer.names}: only convolution weights of up to 8 bits export as int8")
    shape = list(weight_dims)
    n_out = shape[0]
    wq = b.const("w", layer.wq.T.reshape(shape))
    bshape = [n_out] + [1] * (len(shape) - 1)
    ws = b.const("w_scale", layer.w_scale.reshape(bshape))
    wz = [b.const("w_zp", layer.w_zp.reshape(bshape))] if layer.w_zp is not None else []
    deq = _dequant_weight(b, wq, ws, wz, layer)
    conv = type(node)()
    conv.CopyFrom(node)
    conv.input[1] = deq[-1].output[0]
    return [*deq, conv]


def _is_table(t: Any) -> bool:
    return t is not None and t.data_type == 1 and len(t.dims) == 2 and int(np.prod(t.dims)) >= MIN_EMBEDDING_SIZE


def _lower_gather(b: _Builder, node: Any, table: np.ndarray) -> list[Any]:
    """Gather from an int8 table with one symmetric scale per row, then dequantize the gathered rows."""
    if any(a.name == "axis" and a.i != 0 for a in node.attribute):
        return [node]
    absmax = np.abs(table).max(axis=1, keepdims=True)
    scale = np.where(absmax > 0, absmax / 127, 1).astype(np.float32)  # (V, 1)
    codes = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    ids = node.input[1]
    rows = b.node("Gather", [b.const("table", codes), ids], axis=0)
    scales = b.node("Gather", [b.const("row_scale", scale), ids], axis=0)
    cast = b.node("Cast", [rows.output[0]], to=1)
    mul = b.node("Mul", [cast.output[0], scales.output[0]])
    mul.output[0] = node.output[0]
    return [rows, scales, cast, mul]


def _drop_unused_initializers(graph: Any) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _opset(domain: str, version: int) -> Any:
    from onnx import helper

    return helper.make_opsetid(domain, version)
