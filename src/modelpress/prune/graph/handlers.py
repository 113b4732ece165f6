"""Per-layer handlers: cut a layer's tensors physically along its output or input channels.

One small function per layer type and side; adding a layer type means registering its handlers.
`keep` is a sorted 1-D index tensor of the channels that stay. Parameters are replaced by new,
smaller `nn.Parameter`s (an optimizer must be built after pruning), buffers by smaller tensors,
and the layer's size attributes (`out_channels`, `in_features`, ...) are updated so the module
prints, saves, reloads and exports like one built at the new width.

    >>> cut_out(conv, torch.tensor([0, 2, 5]))   # Conv2d(.., 8, ..) -> Conv2d(.., 3, ..)
    >>> cut_in(linear, keep_columns)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from modelpress.primitives.transformer_blocks import cut_linear_in, cut_linear_out, index_tensor

__all__ = [
    "register_out", "register_in", "can_cut_out", "can_cut_in", "cut_out", "cut_in", "index_tensor",
    "channel_tensors",
]  # fmt: skip

Handler = Callable[[nn.Module, torch.Tensor], None]
_OUT: dict[type[nn.Module], Handler] = {}
_IN: dict[type[nn.Module], Handler] = {}


def register_out(*types: type[nn.Module]) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for t in types:
            _OUT[t] = fn
        return fn

    return deco


def register_in(*types: type[nn.Module]) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for t in types:
            _IN[t] = fn
        return fn

    return deco


def _lookup(table: dict[type[nn.Module], Handler], module: nn.Module) -> Handler | None:
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def can_cut_out(module: nn.Module) -> bool:
    return _lookup(_OUT, module) is not None


def can_cut_in(module: nn.Module) -> bool:
    return _lookup(_IN, module) is not None


def cut_out(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only output channels `keep` (for norms and depthwise convs: their only channel dim)."""
    fn = _lookup(_OUT, module)
    if fn is None:
        raise TypeError(f"no output-channel handler for {type(module).__name__}")
    fn(module, keep)


def cut_in(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only input channels `keep`."""
    fn = _lookup(_IN, module)
    if fn is None:
        raise TypeError(f"no input-channel handler for {type(module).__name__}")
    fn(module, keep)


@register_out(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_out(m: nn.Module, keep: torch.Tensor) -> None:
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    if m.groups > 1 and not depthwise:
        raise TypeError(f"grouped {type(m).__name__} (groups={m.groups}) is not cut; only depthwise convs are")
    index_tensor(m, "weight", 0, keep)  # (out, in / groups, *kernel)
    index_tensor(m, "bias", 0, keep)
    m.out_channels = int(keep.numel())
    if depthwise:
        m.in_channels = m.groups = int(keep.numel())


@register_in(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_in(m: nn.Module, keep: torch.Tensor) -> None:
    if m.groups != 1:
        raise TypeError(f"input channels of grouped {type(m).__name__} (groups={m.groups}) are cut with its outputs")
    index_tensor(m, "weight", 1, keep)
    m.in_channels = int(keep.numel())


@register_out(nn.Linear)
def _linear_out(m: nn.Module, keep: torch.Tensor) -> None:
    cut_linear_out(m, keep)  # type: ignore[arg-type]


@register_in(nn.Linear)
def _linear_in(m: nn.Module, keep: torch.Tensor) -> None:
    cut_linear_in(m, keep)  # type: ignore[arg-type]


@register_out(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batchnorm(m: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        index_tensor(m, name, 0, keep)
    m.num_features = int(keep.numel())


@register_out(nn.LayerNorm)
def _layernorm(m: nn.Module, keep: torch.Tensor) -> None:
    if len(m.normalized_shape) != 1:
        raise TypeError(f"LayerNorm over {tuple(m.normalized_shape)} is cut only when it normalizes one dim")
    index_tensor(m, "weight", 0, keep)
    index_tensor(m, "bias", 0, keep)
    m.normalized_shape = (int(keep.numel()),)


@register_out(nn.Embedding)
def _embedding(m: nn.Module, keep: torch.Tensor) -> None:
    index_tensor(m, "weight", 1, keep)  # (vocab, dim)
    m.embedding_dim = int(keep.numel())


def channel_tensors(module: nn.Module, side: str) -> list[tuple[torch.Tensor, int]]:
    """(tensor, channel dim) pairs that carry a layer's channels on `side` ("out" or "in"), for importance."""
    if side == "in":
        w = getattr(module, "weight", None)
        return [(w, 1)] if w is not None and w.dim() >= 2 else []
    if isinstance(module, nn.Embedding):
        return [(module.weight, 1)]
    out = []
    for name in ("weight",):
        w = getattr(module, name, None)
        if w is not None:
            out.append((w, 0))
    return out
