"""GPTQ: quantize a weight matrix column by column, spreading each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

The layer objective is `||X W^T - X Q^T||^2` over calibration inputs `X` (T, K); its Hessian is
`H = 2 X^T X / T` (K, K). Pure tensor math, no modules: the codes, scales and zero points come back in
the layout `QLinear` stores (`weight_q` (N, G, group_size), `weight_scale` / `weight_zero_point` (N, G, 1)),
so the quantized layer holds exactly the codes GPTQ chose.

- damping: `damp * mean(diag(H))` is added to the diagonal; a Hessian that is still not positive
  definite gets ten times more damping (up to `MAX_DAMP_TRIES` times), with a note;
- `block_size` columns are updated at once (lazy batch updates), the rest after each block;
- `act_order`: columns are processed in order of decreasing `diag(H)` (the most active inputs first)
  and the codes are put back with the inverse permutation. Groups stay contiguous in the original
  column order ("static groups": their scales come from the weight before any update), so the
  result needs no group index and maps onto ONNX Runtime's `MatMulNBits` as it is;
- without `act_order`, each group's scale is computed when its first column is reached, from the
  weight as updated so far (the original algorithm);
- a `group_size` that does not divide K leaves a short last group (K % group_size columns, its own
  scale); column `j` belongs to group `j // group_size` of the original order, with or without
  `act_order`. The codes come back padded to whole groups with the zero point (`affine.group_view`).

    >>> h, n = hessian_update(None, 0, x)            # x: (..., K) inputs of the layer, batch after batch
    >>> res = gptq_quantize(weight, h, QuantScheme(4, False, "group", group_size=128))
    >>> w_hat = dequantize(res.q, res.scale, res.zero_point).reshape(weight.shape)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modelpress.core.errors import ConfigError
from modelpress.primitives.affine import QuantScheme, group_codes, n_groups, qparams_from_range

MAX_DAMP_TRIES = 6


@dataclass
class GPTQResult:
    """Codes and qparams in `QLinear`'s layout, plus what the solver had to do."""

    q: torch.Tensor  # (N, G, group_size) in the scheme's storage dtype, G = ceil(K / group_size); (N, K) per channel
    scale: torch.Tensor  # (N, G, 1) float32; (N, 1) per channel
    zero_point: torch.Tensor  # like scale, int32
    loss: float  # sum of (w - q)^2 / [H^-1]_jj over columns: the objective's increase GPTQ accounted for
    damp: float  # the damping fraction finally used
    perm: torch.Tensor | None = None  # the column order used with act_order
    notes: list[str] = field(default_factory=list)  # damping raised, dead inputs, non-finite Hessian


def hessian_update(h: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold inputs `x` (..., K) into the running mean `h = 2 X^T X / T`; returns (h, rows seen).

    A running mean (not a sum) keeps the values in range however many batches arrive.
    """
    rows = x.detach().reshape(-1, x.shape[-1]).float()  # (T, K)
    t = rows.shape[0]
    if h is None:
        h = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
    if t == 0:
        return h, count
    total = count + t
    h = h * (count / total) + (rows.t() @ rows) * (2.0 / total)  # (K, K)
    return h, total


def _group_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (N, 1) for the columns `w` (N, g) of one group."""
    return qparams_from_range(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), scheme)


def usable_hessian(hessian: torch.Tensor, notes: list[str], fallback: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A float copy of `hessian` the solvers can factor, and the mask of its dead inputs (zero on every sample).

    A non-finite Hessian becomes the identity (the solver then acts on the weights alone: `fallback` says
    what that means, noted); dead inputs get a unit diagonal, since nothing flows through them."""
    h = hessian.detach().float().clone()
    if not torch.isfinite(h).all():
        notes.append(f"Hessian has non-finite values (NaN/inf calibration inputs); {fallback}")
        h = torch.eye(h.shape[0], dtype=torch.float32, device=h.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return h, dead


def inverse_hessian_chol(h: torch.Tensor, damp: float, notes: list[str]) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of `H^-1` (K, K), raising the damping until `H + damp * mean(diag) I` factors."""
    k = h.shape[0]
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(k, dtype=torch.float64, device=h.device)
    h64 = h.double()
    for attempt in range(MAX_DAMP_TRIES):
        try:
            chol = torch.linalg.cholesky(h64 + damp * mean_diag * eye)
            hinv = torch.cholesky_inverse(chol)
            upper = torch.linalg.cholesky(hinv, upper=True)
            if attempt:
                notes.append(f"Hessian not positive definite; damping raised to {damp:g}")
            return upper.float(), damp
        except torch.linalg.LinAlgError:
            damp *= 10.0
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with damping {damp / 10:g}")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> GPTQResult:
    """Quantize `weight` (N, K) with GPTQ against `hessian` (K, K) from `hessian_update`.

    `scheme` must be group-wise (any `group_size`: a short last group has its own scale) or per output
    channel. Returns the codes
    and qparams in `QLinear`'s layout. A non-finite Hessian falls back to round-to-nearest (identity
    Hessian) with a note.
    """
    if weight.dim() != 2:
        raise ConfigError(f"GPTQ quantizes 2-D weights (out, in), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ConfigError(f"Hessian shape {tuple(hessian.shape)} does not fit a weight with {k} input columns")
    if scheme.granularity == "group":
        gs = scheme.group_size
    elif scheme.granularity == "channel" and scheme.axis % 2 == 0:
        gs = k
    else:
        raise ConfigError(f"GPTQ needs group-wise or per-output-channel weights, got {scheme.granularity!r}")
    if not 0 < damp <= 1:
        raise ConfigError(f"damp must be in (0, 1], got {damp}")
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")

    notes: list[str] = []
    w = weight.detach().float().clone()
    h, dead = usable_hessian(hessian, notes, "rounded to nearest instead")
    if dead.any():
        notes.append(f"{int(dead.sum())} input column(s) were zero on every calibration sample")

    groups = n_groups(k, gs)
    scale = torch.zeros(n, groups, dtype=torch.float32, device=w.device)
    zero = torch.zeros(n, groups, dtype=torch.int32, device=w.device)
    have = torch.zeros(groups, dtype=torch.bool)
    perm: torch.Tensor | None = None
    if act_order:
        # Static groups: every group's qparams from the weight before any error is spread onto it
        # (the slice of a short last group simply ends at K).
        for g in range(groups):
            s, z = _group_qparams(w[:, g * gs : (g + 1) * gs], scheme)
            scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
        have[:] = True
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    col_group = (perm if perm is not None else torch.arange(k)) // gs  # (K,) original group of each processed column

    hinv, used_damp = inverse_hessian_chol(h, damp, notes)
    codes = torch.zeros(n, k, dtype=torch.int32, device=w.device)  # processed order
    losses = torch.zeros(k, dtype=torch.float32, device=w.device)  # per processed column
    qmin, qmax = scheme.qmin, scheme.qmax
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()  # (N, B)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(col_group[i1 + i])
            if not have[g]:  # first column of its group (no act_order): groups are contiguous here
                cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :gs]  # (N, <= gs): the last may be short
                s, z = _group_qparams(cur, scheme)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                have[g] = True
            col, d = w1[:, i], hinv1[i, i]
            s, z = scale[:, g], zero[:, g].float()
            q = (torch.round(col / s) + z).clamp(qmin, qmax)
            codes[:, i1 + i] = q.to(torch.int32)
            err = (col - (q - z) * s) / d  # (N,)
            losses[i1 + i] = err.pow(2).sum()  # (w - q)^2 / [H^-1]_jj
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy batch update of the columns after the block

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]  # back to the original column order
    q_store = codes.to(scheme.storage_dtype)
    if scheme.granularity == "group":
        return GPTQResult(
            group_codes(q_store, zero.unsqueeze(-1), scheme),  # (N, G, group_size), a short last group padded
            scale.unsqueeze(-1),  # (N, G, 1)
            zero.unsqueeze(-1),
            float(losses.double().sum()),
            used_damp,
            perm,
            notes,
        )
    return GPTQResult(q_store, scale, zero, float(losses.double().sum()), used_damp, perm, notes)  # (N, K), (N, 1)


def layer_output_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """`trace((W - W_hat) H (W - W_hat)^T)`: the mean squared output error (x2) of a layer on its inputs."""
    d = (weight.float() - weight_hat.float()).double()
    return float(torch.einsum("nk,kl,nl->", d, hessian.double(), d))


def gptq_quantize_grouped(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for many independent small problems at once: `weight` (G, R, K) against `hessian` (G, K, K), one
    scale per row (per output channel) from the weight before any update, columns in their own order.

    A depthwise convolution is G = channels problems of one row and K = kernel taps: one call instead of a
    `gptq_quantize` per channel. Returns codes (G, R, K) in the scheme's storage dtype, scales and zero
    points (G, R, 1). Dead inputs get a unit diagonal; damping rises tenfold until every problem factors."""
    if weight.dim() != 3 or hessian.shape != (weight.shape[0], weight.shape[2], weight.shape[2]):
        raise ConfigError(
            f"grouped GPTQ needs weights (G, R, K) and Hessians (G, K, K), got {tuple(weight.shape)} and "
            f"{tuple(hessian.shape)}"
        )
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    h[~torch.isfinite(h).all(-1).all(-1)] = torch.eye(h.shape[-1], dtype=h.dtype)  # nothing to learn from
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    mean_diag = diag.mean(-1, keepdim=True).unsqueeze(-1)  # (G, 1, 1)
    for _ in range(MAX_DAMP_TRIES):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if not info.any():
            break
        damp *= 10.0
    else:
        raise torch.linalg.LinAlgError(f"Hessian not positive definite even with damping {damp / 10:g}")
    upper = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()  # (G, K, K)
    scale, zero = qparams_from_range(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), scheme)  # (G, R, 1)
    codes = torch.zeros_like(w, dtype=torch.int32)
    for i in range(w.shape[-1]):
        col = w[..., i : i + 1]  # (G, R, 1)
        q = (torch.round(col / scale) + zero).clamp(scheme.qmin, scheme.qmax)
        codes[..., i : i + 1] = q.to(torch.int32)
        err = (col - (q - zero) * scale) / upper[:, i, i].reshape(-1, 1, 1)
        w[..., i:] -= err * upper[:, i : i + 1, i:]  # (G, R, 1) x (G, 1, K - i)
    return codes.to(scheme.storage_dtype), scale, zero
