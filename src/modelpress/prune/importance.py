"""Importance scores: how much each weight (or channel) matters. Pure functions on tensors.

Element scores (one per weight, higher = keep):

- `magnitude`: |w| (L1) or w² (L2); the classic baseline (Han et al. 2015).
- `gradient`: |g|, the gradient of the loss on real batches.
- `taylor`: |w·g|, the first-order estimate of the loss change when w is removed (Molchanov 2019).
- `movement`: -Σ w·g accumulated over fine-tuning steps: weights moving towards zero score low
  (Sanh et al. 2020); needs training, so it only applies with a schedule.
- `random`: a seeded uniform baseline that any real criterion should beat.

Channel scores reduce element scores over every dim but the channel dim (`channel_scores`); a
group of coupled tensors sums its members' scores, each normalized by its mean so that a
BatchNorm scale and a conv kernel weigh alike (`group_scores`).

    >>> scores = element_scores("taylor", w, grad)
    >>> channel_scores("magnitude", [(conv.weight, None, 0), (bn.weight, None, 0)], norm="l2")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from modelpress.primitives.masks import rate_mask, threshold_mask

ImportanceKind = Literal["magnitude", "gradient", "taylor", "movement", "random"]
IMPORTANCE_KINDS: tuple[str, ...] = ("magnitude", "gradient", "taylor", "movement", "random")
NEEDS_GRADIENT = ("gradient", "taylor")
Norm = Literal["l1", "l2"]


def magnitude(w: torch.Tensor, norm: Norm = "l1") -> torch.Tensor:
    """|w| for L1, w² for L2 (same ranking per element; they differ once reduced over a channel)."""
    w = w.detach().float()
    return w.abs() if norm == "l1" else w.pow(2)


def gradient(grad: torch.Tensor) -> torch.Tensor:
    """|g|: weights the loss is most sensitive to score highest."""
    return grad.detach().float().abs()


def taylor(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|w·g|: first-order Taylor estimate of the loss change from setting w to 0."""
    return (w.detach().float() * grad.detach().float()).abs()


def movement_update(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One step's movement score -w·g; summed over steps it is high for weights moving away from 0."""
    return -(w.detach().float() * grad.detach().float())


def random_scores(shape: Sequence[int] | torch.Size, seed: int = 0) -> torch.Tensor:
    """Uniform [0, 1) scores from a private generator (the global RNG is untouched)."""
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed))


def element_scores(
    kind: str,
    w: torch.Tensor,
    grad: torch.Tensor | None = None,
    *,
    norm: Norm = "l1",
    movement: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Per-element scores of `w` for importance `kind` (float32, shape of `w`)."""
    if kind == "magnitude":
        return magnitude(w, norm)
    if kind == "random":
        return random_scores(w.shape, seed)
    if kind == "movement":
        if movement is None:
            raise ValueError("movement importance needs scores accumulated during fine-tuning (use a schedule)")
        return movement.detach().float()
    if grad is None:
        raise ValueError(f"{kind} importance needs gradients from real batches; none were collected")
    if kind == "gradient":
        return gradient(grad)
    if kind == "taylor":
        return taylor(w, grad)
    raise ValueError(f"importance must be one of {', '.join(IMPORTANCE_KINDS)}, got {kind!r}")


def reduce_to_channels(scores: torch.Tensor, dim: int, norm: Norm = "l1") -> torch.Tensor:
    """(C,) per-channel totals of element `scores` along `dim`: a sum for L1, sqrt of a sum for L2 (w² in)."""
    moved = scores.movedim(dim, 0).reshape(scores.shape[dim], -1)  # (C, rest)
    total = moved.sum(dim=1)
    return total.sqrt() if norm == "l2" else total


def channel_scores(
    kind: str,
    members: Sequence[tuple[torch.Tensor, torch.Tensor | None, int]],
    norm: Norm = "l1",
    seed: int = 0,
    channel_map: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """(C,) group scores of coupled tensors `(weight, grad, channel_dim)` that share C channels.

    Each member's channel scores are divided by their mean before summing (equal say for every
    member). `channel_map[i]`, when given, maps member i's indices along its dim to group channels
    (e.g. a Linear after a flatten sees each channel H*W times); scores of one channel are summed.
    For `taylor` the per-channel score is |Σ w·g| over the channel's weights (Molchanov 2019).
    """
    total: torch.Tensor | None = None
    for i, (w, grad, dim) in enumerate(members):
        if kind == "random":
            continue
        if kind == "taylor":
            if grad is None:
                raise ValueError("taylor importance needs gradients from real batches; none were collected")
            prod = (w.detach().float() * grad.detach().float()).movedim(dim, 0).reshape(w.shape[dim], -1)
            s = prod.sum(dim=1)  # (C_member,)
            idx = channel_map[i] if channel_map is not None else None
            if idx is not None:
                s = torch.zeros(int(idx.max()) + 1).index_add_(0, idx, s)
            s = s.abs()
        else:
            s = reduce_to_channels(element_scores(kind, w, grad, norm=norm), dim, "l1")  # w² summed for l2
            idx = channel_map[i] if channel_map is not None else None
            if idx is not None:
                s = torch.zeros(int(idx.max()) + 1).index_add_(0, idx, s)
            if norm == "l2" and kind == "magnitude":
                s = s.sqrt()
        s = s / s.mean().clamp(min=1e-12)
        total = s if total is None else total + s
    if total is None:  # random, or no members
        c = members[0][0].shape[members[0][2]] if members else 0
        if channel_map is not None and channel_map and channel_map[0] is not None:
            c = int(channel_map[0].max()) + 1
        return random_scores((c,), seed)
    return total


def select(
    scores: torch.Tensor,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """Keep-mask by rate (exact count) or by threshold (keep scores above it)."""
    if threshold is not None:
        return threshold_mask(scores, threshold)
    if sparsity is None:
        raise ValueError("select() needs a sparsity or a threshold")
    return rate_mask(scores, sparsity)
