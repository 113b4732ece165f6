"""GPTQ rounding for the PTQ passes: each layer's integer weights chosen against its calibration inputs.

Rounding every weight to its nearest grid point (`weight_rounding: nearest`) ignores how the layer's inputs
combine the errors. `weight_rounding: gptq` rounds a layer's weight column by column and spreads each
column's error onto the columns not yet rounded, weighted by the inverse of the inputs' second moment
`H = X^T X` (Frantar et al., 2022, `primitives.gptq`), on the same grid (scale and zero point per output
channel, or per group, from the float weight). A convolution's inputs are its unfolded patches
(`K = in / groups x kernel` columns), each group of a grouped or depthwise convolution with its own `H`.

On EfficientNet-Lite0 (per-channel int8 weights, float activations, no bias correction) the logits'
mean cosine with the float model went from 0.99371 (nearest) to 0.99910 (GPTQ), measured on 256 crops
of test photographs with 64 calibration crops.

`H` is K x K per layer (and per group): the layers are taken in chunks whose matrices fit in
`HESSIAN_BYTES`, one calibration pass per chunk, so a wide model needs several passes, never more memory.

    >>> hessians = layer_hessians(model, {"conv1": model.conv1}, batches, 16)  # on the float model
    >>> ... swap in the integer layers ...
    >>> gptq_round(model.conv1, original_conv1, hessians["conv1"])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.modules import run_hooked, take_batches
from modelpress.primitives.gptq import gptq_quantize, gptq_quantize_grouped

HESSIAN_BYTES = 1 << 30  # float32 second-moment matrices held at once (a chunk of layers per calibration pass)
_PATCH_VALUES = 1 << 24  # unfolded values per step (64 MiB of float32), the batch split to stay below


def layer_columns(module: nn.Module) -> tuple[int, int]:
    """(groups, K): the second-moment matrices a layer needs, each K x K."""
    if isinstance(module, nn.Linear):
        return 1, module.in_features
    kernel = int(torch.Size(module.kernel_size).numel())
    return module.groups, module.in_channels // module.groups * kernel


def _padding(conv: nn.Module) -> list[int]:
    """The explicit zero padding of a convolution, (left, right) per spatial dimension from the last one
    (`F.pad` order); `padding="same"` pads the extra element on the right, as PyTorch does."""
    pads: list[int] = []
    dims = len(conv.kernel_size)
    for i in reversed(range(dims)):
        if conv.padding == "valid":
            left = right = 0
        elif conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = conv.padding[i]
        pads += [left, right]
    return pads


def _patches(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The layer's inputs as (groups, T, K) rows, a slice of the batch at a time."""
    x = x.detach().float()
    if isinstance(module, nn.Linear):
        yield x.reshape(1, -1, x.shape[-1])
        return
    if x.dim() == len(module.kernel_size) + 1:  # an unbatched input
        x = x.unsqueeze(0)
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution of height 1
        x, kernel = x.unsqueeze(2), (1, module.kernel_size[0])
        stride, dilation = (1, module.stride[0]), (1, module.dilation[0])
        pads = _padding(module) + [0, 0]
    else:
        kernel, stride, dilation, pads = module.kernel_size, module.stride, module.dilation, _padding(module)
    groups, k = layer_columns(module)
    per_item = k * groups * max(1, x[0, 0].numel())
    step = max(1, _PATCH_VALUES // per_item)
    for i in range(0, x.shape[0], step):
        part = F.pad(x[i : i + step], pads) if any(pads) else x[i : i + step]
        p = F.unfold(part, kernel, dilation=dilation, stride=stride)  # (B, groups * K, L)
        b, _, positions = p.shape
        yield p.reshape(b, groups, k, positions).permute(1, 0, 3, 2).reshape(groups, b * positions, k)


def _chunks(modules: Mapping[str, nn.Module]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for name, m in modules.items():
        groups, k = layer_columns(m)
        need = groups * k * k * 4
        if chunk and size + need > HESSIAN_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(name)
        size += need
    if chunk:
        yield chunk


def layer_hessians(
    model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable[Any], batches: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, H) for each layer of `modules` (Linear or Conv1d/2d inside `model`): H is (groups, K, K), the sum of
    `x x^T` over the layer's input rows in the first `batches` of `data`. Yields a chunk at a time (see
    `HESSIAN_BYTES`): consume each before asking for the next."""
    for names in _chunks(modules):
        sums: dict[str, torch.Tensor] = {}

        def hook(name: str, sums: dict[str, torch.Tensor] = sums) -> Any:
            def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
                for rows in _patches(module, inputs[0]):
                    h = rows.transpose(1, 2) @ rows
                    sums[name] = sums[name] + h if name in sums else h

            return record

        handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
        run_hooked(model, handles, take_batches(data, batches))
        for n in names:
            if n in sums:
                yield n, sums.pop(n)


def gptq_round(layer: nn.Module, original: nn.Module, hessian: torch.Tensor) -> list[str]:
    """Replace the codes of `layer` (a `QLinear` / `QConv` made from `original`) by GPTQ's on the same scheme;
    returns GPTQ's notes (damping raised, a Hessian that fell back to the identity)."""
    groups, _ = layer_columns(original)
    weight = original.weight.detach().float()
    rows = weight.reshape(groups, weight.shape[0] // groups, -1)  # (groups, out / groups, K)
    notes: list[str] = []
    if groups > 1:  # depthwise / grouped: every group at once
        q, scale, zero = gptq_quantize_grouped(rows, hessian, layer.weight_scheme)
        values = {"weight_q": q, "weight_scale": scale, "weight_zero_point": zero}
    else:
        res = gptq_quantize(rows[0], hessian[0].float(), layer.weight_scheme)
        values, notes = {"weight_q": res.q, "weight_scale": res.scale, "weight_zero_point": res.zero_point}, res.notes
    for name, value in values.items():
        current = getattr(layer, name)
        setattr(layer, name, value.reshape(current.shape).to(current.dtype).contiguous())
    return notes
