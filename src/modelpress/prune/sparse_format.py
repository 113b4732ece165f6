"""A compressed safetensors file for sparse weights: a 1-bit keep-mask plus the non-zero values.

A tensor of `n` entries with `nnz` non-zeros takes `ceil(n / 8) + nnz * itemsize` bytes instead of
`n * itemsize`, so an 80%-sparse fp32 layer shrinks to about 23% of its dense size. Tensors for
which this does not pay off are stored dense. Loading is exact (a bit-for-bit round trip).

File layout (plain safetensors, readable by any safetensors reader):
`<name>.__mask__` uint8 bitstream (first entry in the low bit), `<name>.__values__` the non-zeros in
row-major order, dense tensors under their own name, and metadata `modelpress.sparse` = JSON
{name: {"shape": [...], "dtype": "float32"}}.

    >>> save_sparse(model, "model.sparse.safetensors")
    >>> model.load_state_dict(load_sparse("model.sparse.safetensors"))
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.errors import BadInputError
from modelpress.primitives.masks import pack_mask, unpack_mask

FORMAT = "modelpress-bitmask-v1"
_META_KEY = "modelpress.sparse"
_MASK, _VALUES = ".__mask__", ".__values__"


def _pays_off(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or t.numel() < 64:
        return False
    nnz = int(t.count_nonzero())
    return (t.numel() + 7) // 8 + nnz * t.element_size() < t.numel() * t.element_size()


def encode_sparse(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the compressed encoding of a state dict."""
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, object]] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, t in state.items():
        t = t.detach().cpu()
        key = (t.data_ptr(), t.numel())
        if t.numel() and key in seen:  # tied weights: stored once
            sparse[name] = {"alias": seen[key]}
            continue
        seen[key] = name
        if _pays_off(t):
            flat = t.contiguous().reshape(-1)
            keep = flat != 0
            tensors[name + _MASK] = pack_mask(keep)
            tensors[name + _VALUES] = flat[keep].clone()
            sparse[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            tensors[name] = t.contiguous().clone()
    return tensors, {"format": FORMAT, _META_KEY: json.dumps(sparse)}


def save_sparse(model_or_state: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write the state dict of a (pruned) model in the bitmask encoding, atomically; returns the path."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors, metadata = encode_sparse(dict(state))
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_sparse(path: str | os.PathLike[str], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The dense state dict stored by `save_sparse`; loaded into `model` (strictly) when given."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"sparse weights file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise BadInputError(f"{path} is not a {FORMAT} file (format: {meta.get('format')!r})")
        sparse = json.loads(meta.get(_META_KEY, "{}"))
        state = {k: f.get_tensor(k) for k in f.keys() if not k.endswith((_MASK, _VALUES))}
        for name, info in sparse.items():
            if "alias" in info:
                continue
            shape = tuple(info["shape"])
            keep = unpack_mask(f.get_tensor(name + _MASK), shape).reshape(-1)
            values = f.get_tensor(name + _VALUES)
            dense = torch.zeros(keep.numel(), dtype=getattr(torch, info["dtype"]))
            dense[keep] = values
            state[name] = dense.view(shape)
    for name, info in sparse.items():
        if "alias" in info:
            state[name] = state[info["alias"]]
    ordered = dict(sorted(state.items()))
    if model is not None:
        model.load_state_dict(ordered, strict=True)
    return ordered
