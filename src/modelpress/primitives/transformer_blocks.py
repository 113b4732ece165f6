"""Transformer blocks found by their layout, and cut in width: attention heads and FFN neurons.

Hugging Face encoders and decoders rarely trace with `torch.fx` (data-dependent masks, caches), but
their blocks have fixed layouts, recognized here by attribute names:

- BERT-style self-attention (`query`/`key`/`value` + the parent's `output.dense`), with
  `num_attention_heads` / `attention_head_size` / `all_head_size`;
- DistilBERT's `q_lin`/`k_lin`/`v_lin`/`out_lin`;
- Llama-style attention (`q_proj`/`k_proj`/`v_proj` + `o_proj`, `out_proj` (OPT) or `dense` (Phi), `head_dim`,
  grouped K/V heads);
- an attention layer written by a user: Linear children `q`/`k`/`v` (or `query`/`key`/`value`, `q_proj`/...)
  and `out`/`o`/`proj`/`out_proj`, with its head count in `heads`, `num_heads` or `n_heads`. Its code is not
  known, so such a block is marked `verify`: the pass that cuts it runs the model first (a forward that
  computes the head width from the input width does not survive fewer heads);
- FFNs: BERT `intermediate.dense` -> `output.dense`, gated `gate_proj`/`up_proj` -> `down_proj`,
  `fc1` -> `fc2` (OPT, Phi, ViT-style), `lin1` -> `lin2` (DistilBERT), `linear1` -> `linear2`
  (`nn.TransformerEncoderLayer`), and an `nn.Sequential(Linear, activation, [Dropout,] Linear)` MLP.

`nn.MultiheadAttention` ties its head count to `embed_dim` (its packed projections are as wide as the
input), so its heads cannot be cut without replacing the module: `fixed_attention` names it with the reason.

A head unit is the Q/K/V rows of one head (for grouped-query attention, one K/V head with the query
heads that share it) and the matching output-projection columns. An FFN neuron is one row of the up
projection(s) and one column of the down projection. Cutting keeps the layers' size attributes and the
owner's head counts consistent, so the module prints, saves and exports like one built at that width.

    >>> heads, ffns = find_heads(model), find_ffns(model)
    >>> ffns[0].cut(torch.arange(64))        # keep the first 64 neurons
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def index_tensor(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Replace parameter or buffer `name` of `module` by its slice `keep` along `dim` (None stays None)."""
    t = getattr(module, name, None)
    if t is None:
        return
    new = torch.index_select(t.detach(), dim, keep.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        module._buffers[name] = new


def cut_linear_out(m: nn.Linear, keep: torch.Tensor) -> None:
    """Keep output features `keep` (rows of the weight, entries of the bias)."""
    index_tensor(m, "weight", 0, keep)  # (out, in)
    index_tensor(m, "bias", 0, keep)
    m.out_features = int(keep.numel())


def cut_linear_in(m: nn.Linear, keep: torch.Tensor) -> None:
    """Keep input features `keep` (columns of the weight)."""
    index_tensor(m, "weight", 1, keep)
    m.in_features = int(keep.numel())


# owner attributes that hold a head count: (name, what it counts)
_HEAD_COUNTS = (
    ("num_attention_heads", "q"), ("num_heads", "q"), ("n_heads", "q"), ("heads", "q"),
    ("num_key_value_heads", "kv"), ("all_head_size", "q_width"), ("embed_dim", "q_width"),
)  # fmt: skip


@dataclass
class HeadBlock:
    """One attention layer: `units` prunable head units of `q_per_unit` query heads each."""

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
    verify: bool = False  # a layout whose forward is not known: try the model with fewer heads before cutting

    @property
    def units(self) -> int:
        return self.num_kv_heads

    @property
    def q_per_unit(self) -> int:
        return self.num_heads // self.num_kv_heads

    def q_unit_map(self) -> torch.Tensor:
        """The head unit of every query row (and of every output-projection column)."""
        return torch.arange(self.num_heads * self.head_dim) // (self.head_dim * self.q_per_unit)

    def members(self) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """(weight, dim, unit of each index) of every tensor holding the heads."""
        qmap = self.q_unit_map()
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
        width_before = self.num_heads * hd
        cut_linear_out(self.q, q_rows)
        cut_linear_out(self.k, kv_rows)
        cut_linear_out(self.v, kv_rows)
        cut_linear_in(self.o, q_rows)
        for module, attr, dim in self.per_head:
            tensor = getattr(module, attr)
            tensor.data = tensor.data.index_select(dim, q_heads).contiguous()
        before = {"q": self.num_heads, "kv": self.num_kv_heads, "q_width": width_before}
        self.num_heads = int(q_heads.numel())
        self.num_kv_heads = int(keep_units.numel())
        after = {"q": self.num_heads, "kv": self.num_kv_heads, "q_width": self.num_heads * hd}
        owner = self.owner
        for attr, what in _HEAD_COUNTS:
            if isinstance(getattr(owner, attr, None), int) and getattr(owner, attr) == before[what]:
                setattr(owner, attr, after[what])
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
            cut_linear_out(u, keep)
        cut_linear_in(self.down, keep)


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


_USER_QKV = (("q", "k", "v"), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
_USER_OUT = ("out", "o", "proj", "out_proj", "o_proj", "dense")


def _user_attention(name: str, m: nn.Module) -> HeadBlock | None:
    """A user's attention layer (see the module docstring), to be verified before it is cut."""
    heads = next((getattr(m, a) for a in ("heads", "num_heads", "n_heads") if isinstance(getattr(m, a, None), int)), 0)
    if heads < 1:
        return None
    for qkv in _USER_QKV:
        proj = _linear(m, *qkv)
        if proj is None:
            continue
        out_name = next((o for o in _USER_OUT if isinstance(getattr(m, o, None), nn.Linear)), None)
        if out_name is None or proj[0].out_features % heads:
            return None
        hd = proj[0].out_features // heads
        o = getattr(m, out_name)
        if proj[1].out_features % hd or proj[1].out_features != proj[2].out_features or o.in_features != heads * hd:
            return None
        kv = proj[1].out_features // hd
        if heads % kv:
            return None
        lin = [f"{name}.{n}" for n in (*qkv, out_name)]
        return HeadBlock(name, m, *proj, o, hd, heads, kv, f"{name}.{out_name}", lin, verify=True)
    return None


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
        if isinstance(getattr(m, "head_dim", None), int):  # Llama (o_proj), OPT (out_proj), Phi (dense)
            out = next((o for o in ("o_proj", "out_proj", "dense") if isinstance(getattr(m, o, None), nn.Linear)), "")
            llama = _linear(m, "q_proj", "k_proj", "v_proj", out) if out else None
            if llama is not None:
                hd = m.head_dim
                heads, kv = llama[0].out_features // hd, llama[1].out_features // hd
                if not kv or heads % kv or llama[3].in_features != heads * hd:
                    continue
                lin = [f"{name}.{n}" for n in ("q_proj", "k_proj", "v_proj", out)]
                block = HeadBlock(name, m, *llama, hd, heads, kv, f"{name}.{out}", lin, verify=out != "o_proj")
                blocks.append(_per_head_tensors(block))
                continue
        user = _user_attention(name, m)
        if user is not None:
            blocks.append(_per_head_tensors(user))
    return blocks


def fixed_attention(model: nn.Module) -> dict[str, str]:
    """Attention layers whose heads cannot be cut in place, with the reason (`nn.MultiheadAttention`)."""
    return {
        name: (
            "nn.MultiheadAttention requires num_heads x head_dim == embed_dim (its packed Q/K/V projection is as "
            "wide as its input), so fewer heads would need another module"
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }


_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.LeakyReLU, nn.Mish, nn.ReLU6)


def _sequential_mlp(m: nn.Module) -> tuple[int, int] | None:
    """(up, down) indices of an `nn.Sequential(Linear, activation, [Dropout,] Linear)`, or None."""
    if not isinstance(m, nn.Sequential) or len(m) not in (3, 4):
        return None
    layers = list(m)
    middle_ok = isinstance(layers[1], _ELEMENTWISE) and all(isinstance(x, nn.Dropout) for x in layers[2:-1])
    up, down = layers[0], layers[-1]
    if middle_ok and isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features:
        return 0, len(layers) - 1
    return None


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
        mlp = _sequential_mlp(m)
        if mlp is not None:
            up, down = m[mlp[0]], m[mlp[1]]
            blocks.append(FFNBlock(name, [up], down, [f"{prefix}{mlp[0]}", f"{prefix}{mlp[1]}"]))
            continue
        # OPT / Phi / ViT-style, DistilBERT, nn.TransformerEncoderLayer / DecoderLayer
        for up, down in (("fc1", "fc2"), ("lin1", "lin2"), ("linear1", "linear2")):
            pair = _linear(m, up, down)
            if pair is not None and pair[0].out_features == pair[1].in_features:
                blocks.append(FFNBlock(name, [pair[0]], pair[1], [f"{prefix}{up}", f"{prefix}{down}"]))
                break
    return blocks
