"""Pruning masks: which weights to keep, from importance scores. Pure tensor math, no modules.

A mask is a bool tensor of the scores' shape, `True` = keep. Selection is exact: pruning a rate
`s` of `n` scores removes exactly `round(s * n)` of them (ties broken by position, lowest index
pruned first), so reported and real sparsity agree.

    >>> scores = torch.tensor([[0.1, 0.9, 0.3, 0.2]])
    >>> rate_mask(scores, 0.5)
    tensor([[False,  True,  True, False]])
    >>> nm_mask(scores, n=2, m=4)          # 2 kept in every 4 consecutive inputs
    tensor([[False,  True,  True, False]])
    >>> bits = pack_mask(mask); unpack_mask(bits, mask.shape)   # 1 bit per weight on disk
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from modelpress.primitives.packing import pack_bits, unpack_bits


def _check_rate(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def num_pruned(numel: int, sparsity: float) -> int:
    """How many of `numel` entries a rate `sparsity` prunes: `round(sparsity * numel)`."""
    _check_rate(sparsity)
    return min(int(round(sparsity * numel)), numel)


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the `k` lowest scores; ties go to the lower index (stable sort)."""
    flat = scores.detach().reshape(-1).float()
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.argsort(flat, stable=True)[:k]


def rate_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning exactly `round(sparsity * numel)` lowest-scoring entries."""
    k = num_pruned(scores.numel(), sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[lowest_k(scores, k)] = False
    return mask.view(scores.shape)


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep-mask of the entries scoring strictly above `threshold`."""
    return scores.detach() > threshold


def global_rate_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One rate across all tensors: the `round(sparsity * total)` lowest scores anywhere are pruned.

    Scores of different layers must be comparable (e.g. magnitudes of similarly scaled weights).
    """
    names = list(scores)
    if not names:
        return {}
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])  # (total,)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[lowest_k(flat, num_pruned(flat.numel(), sparsity))] = False
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].view(scores[n].shape)
        start += size
    return out


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly `n` kept in every group of `m` consecutive entries along the last dim.

    The last dim is the input dim of a Linear weight `(out, in)` (a conv weight is flattened to
    `(out, in * kh * kw)` by the caller), the layout sparse tensor cores use for 2:4.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m}")
    if scores.dim() == 0 or scores.shape[-1] % m:
        raise ValueError(f"the last dim ({tuple(scores.shape)}) must be a multiple of m={m} for {n}:{m} sparsity")
    groups = scores.detach().float().reshape(-1, m)  # (G, m)
    # Stable: among equal scores the later position is kept, as in rate_mask (lowest index pruned).
    order = torch.argsort(groups, dim=1, stable=True)  # ascending
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, m - n :], True)
    return mask.view(scores.shape)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of `m` consecutive entries along the last dim holds at most `n` non-zeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.detach().reshape(-1, m) != 0).sum(dim=1) <= n).all())


def sparsity(t: torch.Tensor) -> float:
    """Fraction of exact zeros in `t`."""
    return 1.0 - int(t.count_nonzero()) / max(t.numel(), 1)


def channel_keep(scores: torch.Tensor, n_prune: int, min_keep: int = 1, round_to: int = 1) -> torch.Tensor:
    """Sorted indices of the channels to keep: all but the `n_prune` lowest `scores` (1-D).

    At least `min_keep` channels stay; with `round_to`, the kept count is rounded up to a multiple
    of it (hardware-friendly widths) unless that exceeds the channel count.
    """
    c = scores.numel()
    keep_n = max(c - n_prune, min_keep, 1)
    if round_to > 1:
        keep_n = min(c, -(-keep_n // round_to) * round_to)
    keep = torch.argsort(scores.detach().float(), descending=True, stable=True)[: min(keep_n, c)]
    return torch.sort(keep).values


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as a flat uint8 bitstream, 1 bit per entry (first entry in the low bit)."""
    return pack_bits(mask.reshape(-1).to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_mask`: a bool mask of `shape`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return unpack_bits(packed, 1, numel).to(torch.bool).view(tuple(shape))
