"""Gradients of a loss on real batches, for gradient and Taylor importance.

Without labels, the default loss is a self-supervised proxy: cross-entropy of a classifier's
logits against its own predictions (how much each weight supports what the model decides), or
half the mean square of other outputs (e.g. token states). Pass `loss_fn(model, batch)` for a
task loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.errors import DataError

LossFn = Callable[[nn.Module, tuple[Any, ...]], torch.Tensor]


def _as_args(batch: Any) -> tuple[Any, ...]:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def default_loss(model: nn.Module, batch: tuple[Any, ...]) -> torch.Tensor:
    """Pseudo-label cross-entropy for 2-D logits, else 0.5 * mean(output²)."""
    out = model(*batch)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point():
        return F.cross_entropy(out, out.detach().argmax(dim=1))
    return 0.5 * out.float().pow(2).mean()


def collect_gradients(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    data: Iterable[Any] | None,
    loss_fn: LossFn | None = None,
    max_batches: int = 8,
) -> dict[str, torch.Tensor]:
    """{name: gradient summed over up to `max_batches` batches} for each tensor in `params`.

    The model runs in eval mode (no dropout, BatchNorm statistics untouched); its `.grad` fields
    are left as they were.
    """
    if data is None:
        raise DataError("gradient-based importance needs real input batches: pass data=... (CLI: --data)")
    loss_fn = loss_fn or default_loss
    saved = {id(p): (p.grad, p.requires_grad) for p in model.parameters()}
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(True)
    n = 0
    try:
        with torch.enable_grad():
            for batch in islice(data, max_batches):
                loss_fn(model, _as_args(batch)).backward()
                n += 1
        if n == 0:
            raise DataError("the data for gradient-based importance is empty")
        grads = {}
        for name, t in params.items():
            grads[name] = t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t)
    finally:
        for p in model.parameters():
            p.grad, req = saved.get(id(p), (None, True))
            p.requires_grad_(req)
        for m, flag in flags:
            m.training = flag
    return grads
