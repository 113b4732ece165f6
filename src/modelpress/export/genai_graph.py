"""The decoder graph of the ONNX Runtime GenAI export (`export.genai`): nodes and initializers written with the
onnx helper API, in the layout onnxruntime-genai's model builder gives a Llama.

Each projection is a `MatMulNBits` of our codes (q/k/v of one scheme packed into one), or a float `MatMul`;
RMSNorms are `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` (the residual stream is
their fourth output); attention is `GroupQueryAttention` with the KV cache and rotary embeddings from cos /
sin caches; the embedding a `Gather` (or `GatherBlockQuantized` of the lm_head's codes when tied).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from modelpress.core.errors import BadInputError
from modelpress.export.onnx_graph import MS_DOMAIN, NodeBuilder
from modelpress.export.onnx_nbits import nbits_tensors, unsupported_reason
from modelpress.export.onnx_tables import integer_table, lower_gather
from modelpress.primitives.affine import QuantScheme
from modelpress.quant.modules import QEmbedding, QLinear, holds_table_codes

OPSET = 21
HEAD_GROUP = 32  # values per scale of an lm_head the export quantizes
# With int8 activations (accuracy_level 4) MatMulNBits quantizes the input per block of K: larger groups are
# written as blocks of this many values (the same codes, each group's scale repeated), as fine as the builder's
ACT_BLOCK = 32
CHANNEL_BLOCK = 128  # per-channel weights with float activations: blocks this long, the row's scale in each


def rope_caches(rotary: nn.Module, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (positions, head_dim / 2) as the model's rotary module computes them (its scaling included)."""
    inv_freq = rotary.inv_freq.detach().float().cpu()
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return (angles.cos() * scale).numpy(), (angles.sin() * scale).numpy()


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


class GraphBuilder:
    """Nodes and initializers of the decoder graph; records how each projection was written."""

    def __init__(self, accuracy_level: int, lm_head_bits: int | None, notes: list[str]) -> None:
        self.lm_head_bits = lm_head_bits
        self.notes = notes
        self.graph = onnx.GraphProto()  # initializers (also those `onnx_tables` adds through `NodeBuilder`)
        self.nodes: list[Any] = []
        self.accuracy_level = accuracy_level
        self.act_block = ACT_BLOCK if accuracy_level == 4 else None
        self.nbits: dict[str, str] = {}
        self.floats: dict[str, str] = {}
        self.tables = NodeBuilder(self.graph)

    def const(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(
        self, op: str, inputs: list[str], name: str, outputs: list[str] | None = None, domain: str = "", **attrs: Any
    ) -> list[str]:
        outs = outputs or [f"{name}/out"]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def block(self, scheme: QuantScheme) -> int:
        """The MatMulNBits block a scheme is written in: a group-wise one's group, or `ACT_BLOCK` with int8
        activations; per-channel weights in blocks of `ACT_BLOCK` or `CHANNEL_BLOCK`, each row's scale repeated."""
        if scheme.granularity == "channel":
            return self.act_block or CHANNEL_BLOCK
        return min(scheme.group_size, self.act_block or scheme.group_size)

    # -- projections

    def linear(self, x: str, modules: dict[str, nn.Module], name: str) -> str:
        """x @ W^T + b for one Linear, or for several packed along the output (all QLinear with one scheme
        MatMulNBits can take, or all float); the caller checks that they pack."""
        mods = list(modules.values())
        if all(writable(m) is None for m in mods):
            ws = mods[0].weight_scheme
            block = self.block(ws)
            parts = [nbits_tensors(_reblocked(m, block)) for m in mods]
            b = np.concatenate([p[0] for p in parts])
            scales = np.concatenate([p[1] for p in parts]).reshape(b.shape[0], -1)  # (N, groups)
            inputs = [x, self.const(f"{name}.B", b), self.const(f"{name}.scales", scales)]
            if parts[0][2] is not None:
                inputs.append(self.const(f"{name}.zero_points", np.concatenate([p[2] for p in parts])))
            bias = _bias(mods)
            if bias is not None:
                inputs += [""] * (5 - len(inputs)) + [self.const(f"{name}.bias", bias)]
            n = sum(m.out_features for m in mods)
            blocks = f" (in blocks of {block})" if ws.granularity == "channel" or block != ws.group_size else ""
            layout = "per channel" if ws.granularity == "channel" else f"group {ws.group_size}"
            for key in modules:
                self.nbits[key] = f"int{ws.bits} {'sym' if ws.symmetric else 'asym'} {layout}{blocks}"
            attrs = {"K": mods[0].in_features, "N": n, "bits": ws.bits, "block_size": block}
            return self.node("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN,
                             accuracy_level=self.accuracy_level, **attrs)[0]  # fmt: skip
        weights = []
        for key, m in modules.items():
            if isinstance(m, QLinear):
                why = writable(m) or "not packable with its neighbours"
                self.floats[key] = f"quantized, but {why}: written as its dequantized weight"
                weights.append(m.dequantized_weight())
            else:
                self.floats[key] = "not quantized"
                weights.append(m.weight)
        w = _f32(torch.cat([w.detach().float() for w in weights]).t())  # (K, N)
        y = self.node("MatMul", [x, self.const(f"{name}.weight", w)], f"{name}/MatMul")[0]
        bias = _bias(mods)
        return y if bias is None else self.node("Add", [y, self.const(f"{name}.bias", bias)], f"{name}/Add")[0]

    # -- the model

    def build(self, lm: nn.Module, spec: dict[str, Any]) -> Any:
        body = lm.model
        hd, kvh = spec["head_dim"], spec["kv_heads"]
        n = spec["layers"]
        past = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(n)]
        present = [(f"present.{i}.key", f"present.{i}.value") for i in range(n)]
        kv_shape = ["batch_size", kvh, "past_sequence_length", hd]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"])]  # fmt: skip
        inputs += [helper.make_tensor_value_info(p, TensorProto.FLOAT, kv_shape) for pair in past for p in pair]
        out_kv = ["batch_size", kvh, "total_sequence_length", hd]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch_size", "sequence_length", spec["vocab"]])]  # fmt: skip
        outputs += [helper.make_tensor_value_info(p, TensorProto.FLOAT, out_kv) for pair in present for p in pair]

        # attention bookkeeping GroupQueryAttention takes: per-row last position, total length (int32)
        one = self.const("const.one", np.array([1], dtype=np.int64))
        total = self.node("ReduceSum", ["attention_mask", one], "mask/ReduceSum", keepdims=0)[0]
        last = self.node("Sub", [total, one], "mask/Sub")[0]
        seqlens = self.node("Cast", [last], "mask/seqlens_k", to=TensorProto.INT32)[0]
        shape = self.node("Shape", ["attention_mask"], "mask/Shape")[0]
        width = self.node("Gather", [shape, self.const("const.one_scalar", np.array(1, dtype=np.int64))],
                          "mask/Gather", axis=0)[0]  # fmt: skip
        total_len = self.node("Cast", [width], "mask/total_sequence_length", to=TensorProto.INT32)[0]
        cos, sin = rope_caches(body.rotary_emb, spec["context"])
        cos_name, sin_name = self.const("cos_cache", cos), self.const("sin_cache", sin)

        self.head_codes = self._head_codes(lm)
        x = self.embedding(lm)
        residual = ""
        for i, layer in enumerate(body.layers):
            stem = f"model.layers.{i}"
            h, residual = self.norm(x, residual, layer.input_layernorm, f"{stem}.input_layernorm", spec["eps"])
            attn = layer.self_attn
            qkv = {f"{stem}.self_attn.{p}": getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")}
            if _packable(list(qkv.values())):
                q_k_v = [self.linear(h, qkv, f"{stem}.attn.qkv_proj"), "", ""]
            else:
                q_k_v = [self.linear(h, {k: m}, k) for k, m in qkv.items()]
            gqa_in = [*q_k_v, *past[i], seqlens, total_len, cos_name, sin_name]
            attn_out = f"{stem}.attn/GroupQueryAttention/out"
            heads = {"num_heads": spec["heads"], "kv_num_heads": kvh, "scale": float(hd**-0.5)}
            outs = self.node("GroupQueryAttention", gqa_in, f"{stem}.attn/GroupQueryAttention", [attn_out, *present[i]],
                             domain=MS_DOMAIN, local_window_size=spec["window"], do_rotary=1, rotary_interleaved=0,
                             **heads)  # fmt: skip
            x = self.linear(outs[0], {f"{stem}.self_attn.o_proj": attn.o_proj}, f"{stem}.self_attn.o_proj")
            h, residual = self.norm(x, residual, layer.post_attention_layernorm, f"{stem}.post_attention_layernorm",
                                    spec["eps"])  # fmt: skip
            mlp = layer.mlp
            gate = self.linear(h, {f"{stem}.mlp.gate_proj": mlp.gate_proj}, f"{stem}.mlp.gate_proj")
            up = self.linear(h, {f"{stem}.mlp.up_proj": mlp.up_proj}, f"{stem}.mlp.up_proj")
            sig = self.node("Sigmoid", [gate], f"{stem}.mlp/Sigmoid")[0]
            silu = self.node("Mul", [gate, sig], f"{stem}.mlp/SiLU")[0]
            act = self.node("Mul", [silu, up], f"{stem}.mlp/Mul")[0]
            x = self.linear(act, {f"{stem}.mlp.down_proj": mlp.down_proj}, f"{stem}.mlp.down_proj")
        h, _ = self.norm(x, residual, body.norm, "model.norm", spec["eps"])
        logits = self.lm_head(lm, h)
        self.nodes[-1].output[0] = "logits"
        del logits
        graph = helper.make_graph(self.nodes, "modelpress-genai-decoder", inputs, outputs)
        graph.initializer.extend(self.graph.initializer)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)])  # fmt: skip
        proto.producer_name = "modelpress"
        return proto

    def norm(self, x: str, residual: str, module: nn.Module, name: str, eps: float) -> tuple[str, str]:
        """RMSNorm of x (+ residual): (normalized, new residual stream)."""
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", eps)))
        w = self.const(f"{name}.weight", _f32(module.weight))
        if not residual:
            return self.node("SimplifiedLayerNormalization", [x, w], name, axis=-1, epsilon=eps, stash_type=1)[0], x
        outs = [f"{name}/out", "", "", f"{name}/residual"]
        self.node("SkipSimplifiedLayerNormalization", [residual, x, w], name, outs, domain=MS_DOMAIN, epsilon=eps)
        return outs[0], outs[3]

    def embedding(self, lm: nn.Module) -> str:
        emb = lm.get_input_embeddings()
        shared = holds_table_codes(lm.get_output_embeddings(), emb)  # a tied head quantized with its table
        if isinstance(emb, QEmbedding) and not shared:
            codes, scales, blocks = integer_table(self.tables, emb.dequantized_weight().numpy(), emb)
            nodes = lower_gather(self.tables, helper.make_node("Gather", ["", "input_ids"], ["embed/out"]), codes,
                                 scales, blocks)  # fmt: skip
            self.nodes.extend(nodes)
            return "embed/out"
        if not shared and (not isinstance(emb, nn.Embedding) or emb.max_norm is not None):
            raise BadInputError(f"the input embedding is a {type(emb).__name__}: the GenAI decoder maps nn.Embedding "
                                "and QEmbedding")  # fmt: skip
        tied = _tied(lm) or shared
        if tied and self.head_codes is not None:  # the lm_head's codes serve the lookup too (one table)
            q = self.head_codes
            shape = self.const("lm_head.table_shape", np.array([q.out_features, -1], dtype=np.int64))
            data = self.node("Reshape", ["lm_head.B", shape], "embed/Reshape")[0]  # (V, H * bits / 8)
            block = {"bits": q.weight_scheme.bits, "block_size": self.block(q.weight_scheme)}
            gbq = [data, "input_ids", "lm_head.scales"]
            return self.node("GatherBlockQuantized", gbq, "embed/GatherBlockQuantized", domain=MS_DOMAIN,
                             gather_axis=0, quantize_axis=1, **block)[0]  # fmt: skip
        if tied:  # one float (H, V) table serves both; rows are gathered along its second axis
            table = self.const("lm_head.weight_t", _f32(emb.weight.t()))
            cols = self.node("Gather", [table, "input_ids"], "embed/Gather", axis=1)[0]  # (H, B, S)
            return self.node("Transpose", [cols], "embed/Transpose", perm=[1, 2, 0])[0]
        table = self.const("embed_tokens.weight", _f32(emb.weight))
        return self.node("Gather", [table, "input_ids"], "embed/Gather", axis=0)[0]

    def _head_codes(self, lm: nn.Module) -> QLinear | None:
        """The float lm_head quantized by the export (`lm_head_bits`, symmetric, round to nearest), or None."""
        head = lm.get_output_embeddings()
        if holds_table_codes(head, lm.get_input_embeddings()):
            why = writable(head)
            if why is not None:  # e.g. int8 activations: one table cannot be both a MatMulNBits and a float lookup
                raise BadInputError(f"lm_head shares its codes with the embedding table, but {why}: the GenAI "
                                    "decoder writes a shared table as MatMulNBits codes only")  # fmt: skip
            return head  # quantized with its tied table: its own codes serve both
        if self.lm_head_bits is None or type(head) is not nn.Linear:
            return None
        if head.in_features % HEAD_GROUP:
            self.notes.append(f"lm_head kept float: its width {head.in_features} is not a multiple of {HEAD_GROUP}")
            return None
        return QLinear.from_float(head, QuantScheme(self.lm_head_bits, True, "group", 0, HEAD_GROUP))

    def lm_head(self, lm: nn.Module, h: str) -> str:
        head = lm.get_output_embeddings()
        if not isinstance(head, (nn.Linear, QLinear)):
            raise BadInputError(f"lm_head is a {type(head).__name__}; the GenAI decoder maps Linear and QLinear")
        q = self.head_codes
        if q is not None:
            out = self.linear(h, {"lm_head": q}, "lm_head")
            if holds_table_codes(head, lm.get_input_embeddings()):
                self.nbits["lm_head"] += ", its codes also serve the embedding lookup (one table)"
                return out
            tied = " (tied: the embedding lookup reads the same codes)" if _tied(lm) else ""
            # (the tied lookup reads lm_head.B and lm_head.scales, written here)
            self.nbits["lm_head"] += f", quantized by the export (round to nearest){tied}"
            return out
        if _tied(lm):
            self.floats["lm_head"] = "not quantized (tied to the embedding: one table for both)"
            return self.node("MatMul", [h, "lm_head.weight_t"], "lm_head/MatMul")[0]
        return self.linear(h, {"lm_head": head}, "lm_head")


def _tied(lm: nn.Module) -> bool:
    """A float lm_head (no bias) that shares its weight with a float embedding table."""
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    return type(head) is nn.Linear and type(emb) is nn.Embedding and head.weight is emb.weight and head.bias is None


def writable(layer: nn.Module) -> str | None:
    """Why `layer` cannot be a MatMulNBits of the decoder (None: it can): `onnx_nbits`' group-wise weights, and
    per-channel ones too, written in blocks each carrying its row's scale (exact)."""
    return unsupported_reason(layer, channels=True)


def _packable(mods: list[nn.Module]) -> bool:
    """q, k, v fit one MatMulNBits (the same scheme) or one float MatMul (all float)."""
    if all(isinstance(m, nn.Linear) for m in mods):
        return True
    if not all(writable(m) is None for m in mods):
        return False
    return len({m.weight_scheme for m in mods}) == 1 and (mods[0].bias is None) == all(m.bias is None for m in mods)


def _reblocked(layer: QLinear, block: int) -> Any:
    """`layer`'s codes, scales and zero points in blocks of `block` (a divisor of its group size, or any block
    for per-channel weights): the same weight, each group's (row's) scale and zero point repeated over its
    blocks, a short last block padded with the zero point (dequantized to 0), as `nbits_tensors` reads them."""
    ws = layer.weight_scheme
    n, k = layer.out_features, layer.in_features
    count = -(-k // block)
    if ws.granularity == "channel":
        scale = layer.weight_scale.reshape(n, 1, 1).expand(n, count, 1)
        zp = layer.weight_zero_point.reshape(n, 1, 1).expand(n, count, 1)
    elif block == ws.group_size:
        return layer
    else:
        per = ws.group_size // block
        scale = layer.weight_scale.repeat_interleave(per, dim=1)[:, :count]  # (N, count, 1)
        zp = layer.weight_zero_point.repeat_interleave(per, dim=1)[:, :count]
    codes = layer.weight_q.reshape(n, -1)[:, :k]
    pad = zp[:, -1].to(codes.dtype).expand(n, count * block - k)
    codes = torch.cat([codes, pad], dim=1).reshape(n, count, block)
    scheme = dataclasses.replace(ws, granularity="group", group_size=block)
    return SimpleNamespace(weight_scheme=scheme, weight_q=codes, weight_scale=scale, weight_zero_point=zp)


def _bias(mods: list[nn.Module]) -> np.ndarray | None:
    if all(m.bias is None for m in mods):
        return None
    return np.concatenate([_f32(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
                           for m in mods])  # fmt: skip
