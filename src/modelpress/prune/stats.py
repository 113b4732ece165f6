"""What pruning changed: parameters, non-zeros, per-layer sparsity and FLOPs of one forward pass.

FLOPs are counted by torch's dispatch-level `FlopCounterMode` over one real forward (every matmul,
conv and attention kernel; elementwise ops are not counted), with CPU scaled-dot-product attention
added (torch counts only the GPU kernels).

    >>> count_flops(model, entry.example_inputs(1))
    5435817984
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from modelpress.core.modules import count_params


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with every submodule in eval mode, restoring each one's own flag after.

    (`model.train(flag)` would set all submodules alike, e.g. switch on a backbone's dropout.)
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_formulas() -> dict[Any, Any]:
    aten = torch.ops.aten
    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        if hasattr(aten, name):
            ops[getattr(aten, name)] = _cpu_sdpa_flops
    return ops


def count_flops(model: nn.Module, inputs: Sequence[Any] | torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one forward of `model` on `inputs`."""
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_formulas()) as fc:
        model(*args)
    return int(fc.get_total_flops())


def layer_sparsity(model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)) -> dict:
    """{layer name: fraction of zero weights} for the layers of `types`, rounded to 4 places."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, types) and getattr(m, "weight", None) is not None:
            w = m.weight.detach()
            out[name] = round(1.0 - int(w.count_nonzero()) / max(w.numel(), 1), 4)
    return out


def model_summary(model: nn.Module, inputs: Sequence[Any] | torch.Tensor | None) -> dict[str, int | None]:
    """params, non-zero params and FLOPs (None without inputs) of `model`."""
    params, nonzero = count_params(model)
    flops = count_flops(model, inputs) if inputs is not None else None
    return {"params": params, "nonzero_params": nonzero, "flops": flops}


def layer_flops(model: nn.Module, inputs: Sequence[Any] | torch.Tensor) -> dict[str, int]:
    """{name: FLOPs} of each Linear / Conv layer in one forward, measured by forward hooks.

    FLOPs of a layer = 2 x output elements x weights per output (in / groups x kernel area).
    """
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    flops: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):

            def hook(mod: nn.Module, _args: Any, out: torch.Tensor, name: str = name) -> None:
                w = mod.weight
                per_out = w.numel() // w.shape[0]  # in / groups * kernel area
                flops[name] = flops.get(name, 0) + 2 * out.numel() * per_out

            handles.append(m.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return flops
