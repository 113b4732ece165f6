"""Known transformer block patterns: attention heads and FFN neurons, found without tracing.

Hugging Face encoders and decoders rarely trace with `torch.fx` (data-dependent masks, caches),
but their blocks have fixed layouts, recognized here by attribute names:

- BERT-style self-attention (`query`/`key`/`value` + the parent's `output.dense`), with
  `num_attention_heads` / `attention_head_size` / `all_head_size`;
- Llama-style attention (`q_proj`/`k_proj`/`v_proj`/`o_proj`, `head_dim`, grouped K/V heads);
- FFNs: BERT `intermediate.dense` -> `output.dense`, gated `gate_proj`/`up_proj` -> `down_proj`,
  and `fc1` -> `fc2`.

A head unit is the Q/K/V rows of one head (for grouped-query attention, one K/V head with the
query heads that share it) and the matching output-projection columns. An FFN neuron is one row
of the up projection(s) and one column of the down projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.prune.graph.handlers import cut_in, cut_out


@dataclass
class HeadBlock:
    """One attention layer: `units` prunable head units of `unit_rows` Q rows each."""

    name: str
    owner: nn.Module  # the module holding the head-count attributes
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    num_heads: int
    num_kv_heads: int
    o_name: str = ""
    linear_names: list[str] = field(default_factory=list)
    # per-head tensors of the layer beside its projections: (module holding it, attribute, dim of the heads)
    per_head: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    skipped: str | None = None  # why its heads cannot be cut (a tensor of the layer that is not understood)

    @property
    def units(self) -> int:
        return self.num_kv_heads

    @property
    def q_per_unit(self) -> int:
        return self.num_heads // self.num_kv_heads

    def members(self) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """(weight, dim, unit of each index) of every tensor holding the heads."""
        qmap = torch.arange(self.num_heads * self.head_dim) // (self.head_dim * self.q_per_unit)
        kvmap = torch.arange(self.num_kv_heads * self.head_dim) // self.head_dim
        return [
            (self.q.weight, 0, qmap),
            (self.k.weight, 0, kvmap),
            (self.v.weight, 0, kvmap),
            (self.o.weight, 1, qmap),
        ]

    def cut(self, keep_units: torch.Tensor) -> None:
        """Keep head units `keep_units` (sorted); update the layer's head counts."""
        hd, qpu = self.head_dim, self.q_per_unit
        q_heads = (keep_units[:, None] * qpu + torch.arange(qpu)).reshape(-1)  # query heads of the kept units
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        kv_rows = (keep_units[:, None] * hd + torch.arange(hd)).reshape(-1)
        cut_out(self.q, q_rows)
        cut_out(self.k, kv_rows)
        cut_out(self.v, kv_rows)
        cut_in(self.o, q_rows)
        for module, attr, dim in self.per_head:
            tensor = getattr(module, attr)
            tensor.data = tensor.data.index_select(dim, q_heads).contiguous()
        self.num_heads = int(q_heads.numel())
        self.num_kv_heads = int(keep_units.numel())
        owner = self.owner
        for attr, value in (
            ("num_attention_heads", self.num_heads),
            ("num_heads", self.num_heads),
            ("n_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("all_head_size", self.num_heads * hd),
        ):
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, value)
        if self.num_heads * hd != self.q.in_features and hasattr(owner, "query"):
            # ORT's fused Attention op (export.onnx) assumes Q/K/V as wide as the hidden size.
            owner.no_fuse = True


@dataclass
class FFNBlock:
    """One feed-forward layer: `ups` produce the neurons (rows), `down` reads them (columns)."""

    name: str
    ups: list[nn.Linear]
    down: nn.Linear
    linear_names: list[str] = field(default_factory=list)

    @property
    def units(self) -> int:
        return self.down.in_features

    def members(self) -> list[tuple[torch.Tensor, int, torch.Tensor | None]]:
        return [(u.weight, 0, None) for u in self.ups] + [(self.down.weight, 1, None)]

    def cut(self, keep: torch.Tensor) -> None:
        for u in self.ups:
            cut_out(u, keep)
        cut_in(self.down, keep)


def _linear(m: nn.Module, *names: str) -> list[nn.Linear] | None:
    out = [getattr(m, n, None) for n in names]
    return out if all(isinstance(x, nn.Linear) for x in out) else None  # type: ignore[return-value]


# Per-head tensors known beside the projections: attribute -> the dim that holds the heads
_PER_HEAD = {"relative_position_bias_table": -1}  # Swin / BEiT: a bias per relative position and head


def _per_head_tensors(block: HeadBlock) -> HeadBlock:
    """`block` with the per-head tensors its layer holds beside Q/K/V/O (Swin's relative position bias table), or
    `skipped` with the reason when the layer holds one whose heads cannot be told apart. A vector of `head_dim`
    values (Qwen3's and Gemma3's q/k norms) is shared by every head and stays as it is."""
    inside = {id(p) for lin in (block.q, block.k, block.v, block.o) for p in lin.parameters()}
    for pname, p in block.owner.named_parameters():
        if id(p) in inside:
            continue
        holder, _, attr = pname.rpartition(".")
        dim = _PER_HEAD.get(attr)
        if dim is not None and p.shape[dim] == block.num_heads and block.num_kv_heads == block.num_heads:
            block.per_head.append((block.owner.get_submodule(holder) if holder else block.owner, attr, dim))
        elif p.dim() == 1 and p.shape[0] == block.head_dim:
            continue
        elif block.num_heads in p.shape or block.num_kv_heads in p.shape:
            block.skipped = (
                f"{block.name}.{pname} {list(p.shape)} may hold one value per head, and head pruning does not know "
                "how to cut it"
            )
    return block


def find_heads(model: nn.Module) -> list[HeadBlock]:
    """Every recognized attention layer of `model`, in module order (`skipped` says why one cannot be cut)."""
    blocks = []
    for name, m in model.named_modules():
        parent_name = name.rpartition(".")[0]
        bert = _linear(m, "query", "key", "value")
        if bert is not None and isinstance(getattr(m, "attention_head_size", None), int):
            parent = model.get_submodule(parent_name) if parent_name else model
            out = getattr(getattr(parent, "output", None), "dense", None)
            if not isinstance(out, nn.Linear):
                continue
            hd = m.attention_head_size
            heads = bert[0].out_features // hd
            o_name = f"{parent_name}.output.dense" if parent_name else "output.dense"
            lin = [f"{name}.{n}" for n in ("query", "key", "value")] + [o_name]
            blocks.append(_per_head_tensors(HeadBlock(name, m, *bert, out, hd, heads, heads, o_name, lin)))
            continue
        distil = _linear(m, "q_lin", "k_lin", "v_lin", "out_lin")  # DistilBERT
        if distil is not None and isinstance(getattr(m, "attention_head_size", None), int):
            hd = m.attention_head_size
            heads = distil[0].out_features // hd
            lin = [f"{name}.{n}" for n in ("q_lin", "k_lin", "v_lin", "out_lin")]
            blocks.append(_per_head_tensors(HeadBlock(name, m, *distil, hd, heads, heads, f"{name}.out_lin", lin)))
            continue
        llama = _linear(m, "q_proj", "k_proj", "v_proj", "o_proj")
        if llama is not None and isinstance(getattr(m, "head_dim", None), int):
            hd = m.head_dim
            heads, kv = llama[0].out_features // hd, llama[1].out_features // hd
            if heads % kv:
                continue
            lin = [f"{name}.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            blocks.append(_per_head_tensors(HeadBlock(name, m, *llama, hd, heads, kv, f"{name}.o_proj", lin)))
    return blocks


def find_ffns(model: nn.Module) -> list[FFNBlock]:
    """Every recognized feed-forward layer of `model`, in module order."""
    blocks = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        inter = getattr(getattr(m, "intermediate", None), "dense", None)
        out = getattr(getattr(m, "output", None), "dense", None)
        if isinstance(inter, nn.Linear) and isinstance(out, nn.Linear) and inter.out_features == out.in_features:
            names = [f"{prefix}intermediate.dense", f"{prefix}output.dense"]
            blocks.append(FFNBlock(name, [inter], out, names))
            continue
        gated = _linear(m, "gate_proj", "up_proj", "down_proj")
        if gated is not None and gated[0].out_features == gated[2].in_features:
            names = [f"{prefix}{n}" for n in ("gate_proj", "up_proj", "down_proj")]
            blocks.append(FFNBlock(name, gated[:2], gated[2], names))
            continue
        for up, down in (("fc1", "fc2"), ("lin1", "lin2")):  # OPT / Phi / ViT-style, DistilBERT
            pair = _linear(m, up, down)
            if pair is not None and pair[0].out_features == pair[1].in_features:
                blocks.append(FFNBlock(name, [pair[0]], pair[1], [f"{prefix}{up}", f"{prefix}{down}"]))
                break
    return blocks
