"""Masks that stay applied while a model trains, and gradual pruning driven by the training loop.

A mask is a parametrization (`torch.nn.utils.parametrize`): the layer's `weight` is computed as
`original * mask` on every forward, so pruned weights stay exactly zero through any optimizer
step (their gradient is masked too), and `make_permanent` bakes `original * mask` into a plain
`weight` at the end.

`GradualPruner` needs no access to the training loop: a forward pre-hook counts training steps
(forward passes in train mode with gradients on) and recomputes the masks on the schedule, and
gradient hooks accumulate the scores that need training signal (movement, gradient, Taylor).

    >>> set_mask(layer, keep)          # (out, in) bool
    >>> train(model)                   # pruned weights stay 0
    >>> make_permanent(model)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from modelpress.prune.importance import element_scores, movement_update
from modelpress.prune.schedule import PolynomialSchedule


class WeightMask(nn.Module):
    """Parametrization `weight = original * mask`; the mask is a buffer (saved with the state dict)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The layer's current keep-mask, or None if it is not masked."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:  # type: ignore[union-attr]
            if isinstance(p, WeightMask):
                return p.mask.bool()
    return None


def original_weight(module: nn.Module) -> torch.Tensor:
    """The trainable tensor behind a (possibly masked) weight."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original  # type: ignore[union-attr]
    return module.weight  # type: ignore[return-value]


def set_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Mask `module.weight` with the bool `keep` (its shape), replacing any previous mask."""
    if tuple(keep.shape) != tuple(module.weight.shape):
        raise ValueError(f"mask shape {tuple(keep.shape)} does not match weight {tuple(module.weight.shape)}")
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:  # type: ignore[union-attr]
            if isinstance(p, WeightMask):
                p.mask.copy_(keep.to(p.mask.dtype))
                return
    mask = keep.to(device=module.weight.device, dtype=module.weight.dtype)
    parametrize.register_parametrization(module, "weight", WeightMask(mask))


def make_permanent(model: nn.Module) -> int:
    """Replace every masked weight by the plain tensor `original * mask`; returns how many layers."""
    n = 0
    for module in model.modules():
        if get_mask(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            n += 1
    return n


MaskFn = Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]]


class GradualPruner:
    """Recomputes masks on a `PolynomialSchedule` while any training loop runs the model.

    `mask_fn(scores, sparsity)` turns {layer: scores} into {layer: keep-mask}; already-pruned
    weights are given the lowest score so masks only grow.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        schedule: PolynomialSchedule,
        final: float,
        importance: str,
        mask_fn: MaskFn,
        seed: int = 0,
        initial_grads: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.model, self.layers, self.schedule, self.final = model, layers, schedule, final
        self.importance, self.mask_fn, self.seed = importance, mask_fn, seed
        self.step = 0
        self.current = 0.0
        self.history: list[tuple[int, float]] = []
        self.accum: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        for name, m in layers.items():
            if get_mask(m) is None:
                set_mask(m, torch.ones_like(m.weight, dtype=torch.bool))
            if importance in ("movement", "gradient", "taylor"):
                self.accum[name] = torch.zeros_like(m.weight, dtype=torch.float32)
                if initial_grads and name in initial_grads:
                    self._accumulate(name, m, initial_grads[name])

    def _accumulate(self, name: str, module: nn.Module, grad: torch.Tensor) -> None:
        w = original_weight(module).detach()
        if self.importance == "movement":
            self.accum[name] += movement_update(w, grad)
        elif self.importance == "gradient":
            self.accum[name] += grad.detach().float().abs()
        else:  # taylor: |w·g| summed over steps
            self.accum[name] += (w.float() * grad.detach().float()).abs()

    def attach(self) -> GradualPruner:
        def pre_hook(module: nn.Module, args: Any) -> None:
            if module.training and torch.is_grad_enabled():
                if self.schedule.is_update_step(self.step):
                    self.update(self.schedule.sparsity_at(self.step, self.final))
                self.step += 1

        self._handles.append(self.model.register_forward_pre_hook(pre_hook))
        for name, m in self.layers.items():
            if name in self.accum:
                param = original_weight(m)

                def grad_hook(p: torch.Tensor, name: str = name, m: nn.Module = m) -> None:
                    if p.grad is not None:
                        self._accumulate(name, m, p.grad)

                self._handles.append(param.register_post_accumulate_grad_hook(grad_hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def update(self, sparsity: float) -> None:
        """Recompute every mask at `sparsity` (never un-pruning a weight)."""
        if sparsity <= self.current and self.history:
            return
        if self.accum and all(not bool(a.any()) for a in self.accum.values()):
            return  # no training signal yet (before the first backward): wait for the next update
        scores = {}
        with torch.no_grad():
            for i, (name, m) in enumerate(self.layers.items()):
                s = element_scores(
                    "magnitude" if self.importance in ("movement", "gradient", "taylor") else self.importance,
                    m.weight,
                    seed=self.seed + i,
                ).clone()
                if name in self.accum:
                    s = self.accum[name].clone()
                keep = get_mask(m)
                if keep is not None:
                    s[~keep] = float("-inf")
                scores[name] = s
            masks = self.mask_fn(scores, sparsity)
            for name, m in self.layers.items():
                set_mask(m, masks[name])
        self.current = sparsity
        self.history.append((self.step, round(sparsity, 4)))
