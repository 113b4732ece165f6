"""LLM pruning without retraining: SparseGPT (Frantar & Alistarh, 2023) and Wanda (Sun et al., 2023).

Both read statistics of a layer's inputs `X` (T, K) on calibration data and return a pruned weight of
the same shape; pure tensor math, no modules.

- **SparseGPT** solves the layer-wise reconstruction `min ||X W^T - X W_hat^T||^2` with a sparse
  `W_hat`, column by column like GPTQ: a column's pruned entries are set to zero and the error is
  spread onto the columns not yet visited through the upper Cholesky factor of `H^-1` (`H = 2 X^T X / T`,
  damped as in GPTQ). The mask is chosen `block_size` columns at a time by the saliency
  `w^2 / [H^-1]_jj^2` (unstructured: the lowest `sparsity` of each block, row by row so every output
  keeps the same count), or `n` of every `m` consecutive inputs (N:M). The kept weights are updated.
- **Wanda** scores each weight by `|w_ij| * ||X_j||_2` (its magnitude times the norm of its input over
  the calibration tokens) and prunes the lowest `sparsity` of every output row (or N:M along the
  inputs); kept weights are not changed.

    >>> h, count = hessian_update(None, 0, x)          # x: (..., K) inputs of the layer
    >>> res = sparsegpt_prune(weight, h, sparsity=0.5)  # or n=2, m=4
    >>> w = wanda_prune(weight, column_sq_norms(None, x), sparsity=0.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modelpress.core.errors import ConfigError
from modelpress.primitives.gptq import inverse_hessian_chol, usable_hessian
from modelpress.primitives.masks import nm_mask


@dataclass
class SparseResult:
    """A pruned weight and what the solver had to do."""

    weight: torch.Tensor  # (N, K), zeros where pruned
    loss: float  # sum of w^2 / [H^-1]_jj over pruned entries: the objective's increase SparseGPT accounted for
    notes: list[str] = field(default_factory=list)


def check_pattern(sparsity: float, n: int, m: int) -> None:
    """ConfigError unless exactly one of a rate in (0, 1) or an `n:m` pattern (0 < n < m) is given."""
    if n or m:
        if not 0 < n < m:
            raise ConfigError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m}")
        if m > 64:
            raise ConfigError(f"m must be <= 64, got {m}")
    elif not 0.0 < sparsity < 1.0:
        raise ConfigError(f"sparsity must be in (0, 1), got {sparsity}")


def _row_rate_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune-mask (True = pruned) with the lowest `round(sparsity * cols)` scores of every row."""
    k = int(round(sparsity * scores.shape[1]))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    return mask


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
) -> SparseResult:
    """Prune `weight` (N, K) against `hessian` (K, K): a rate (`sparsity`) or an `n:m` pattern (`n`, `m`)."""
    check_pattern(sparsity, n, m)
    if weight.dim() != 2:
        raise ConfigError(f"SparseGPT prunes 2-D weights (out, in), got shape {tuple(weight.shape)}")
    rows, k = weight.shape
    if hessian.shape != (k, k):
        raise ConfigError(f"Hessian shape {tuple(hessian.shape)} does not fit a weight with {k} input columns")
    if m and k % m:
        raise ConfigError(f"input width {k} is not a multiple of m={m} for {n}:{m} sparsity")
    if block_size < 1 or (m and block_size % m):
        raise ConfigError(f"block_size must be >= 1 (and a multiple of m for N:M), got {block_size}")
    notes: list[str] = []
    w = weight.detach().float().clone()
    h, dead = usable_hessian(hessian, notes, "pruned by magnitude instead")
    if dead.any():  # inputs that were always zero: their weights never contribute
        w[:, dead] = 0.0
        notes.append(f"{int(dead.sum())} input column(s) were zero on every calibration sample (pruned)")
    hinv, _ = inverse_hessian_chol(h, damp, notes)
    loss = torch.zeros((), dtype=torch.float64)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if m:
            saliency = w1.pow(2) / d.pow(2).unsqueeze(0)
            pruned = ~nm_mask(saliency, n, m)  # the block is a whole number of groups of m
        else:
            pruned = _row_rate_mask(w1.pow(2) / d.pow(2).unsqueeze(0), sparsity)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(col), col)
            err = (col - q) / d[i]
            loss += err.double().pow(2).sum() * float(d[i])  # (w - q)^2 / d
            w1[:, i] = q
            w1[:, i + 1 :] -= err.unsqueeze(1) * hinv1[i, i + 1 :].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return SparseResult(w.to(weight.dtype), float(loss), notes)


def column_sq_norms(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Fold inputs `x` (..., K) into the per-input sum of squares (K,) that Wanda's scores use."""
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    sq = rows.pow(2).sum(dim=0)
    return sq if acc is None else acc + sq


def wanda_prune(
    weight: torch.Tensor, col_sq_norms: torch.Tensor, *, sparsity: float = 0.5, n: int = 0, m: int = 0
) -> torch.Tensor:
    """`weight` (N, K) with the lowest `|w| * ||X_j||` of each row (or of each group of `m` inputs) zeroed."""
    check_pattern(sparsity, n, m)
    if weight.dim() != 2 or col_sq_norms.shape != (weight.shape[1],):
        raise ConfigError(
            f"Wanda needs a 2-D weight and one norm per input column, got {tuple(weight.shape)} "
            f"and {tuple(col_sq_norms.shape)}"
        )
    if m and weight.shape[1] % m:
        raise ConfigError(f"input width {weight.shape[1]} is not a multiple of m={m} for {n}:{m} sparsity")
    scores = weight.detach().float().abs() * col_sq_norms.float().clamp_min(0).sqrt().unsqueeze(0)
    pruned = ~nm_mask(scores, n, m) if m else _row_rate_mask(scores, sparsity)
    return weight.detach().masked_fill(pruned, 0.0)
