"""Range estimation for static quantization: observers see calibration batches, then pick a range.

The estimator is a config field (`ObserverConfig.kind`):

- `minmax`: running min and max (per tensor, or per channel).
- `moving_average`: exponential moving average of each batch's min and max (per tensor or channel).
- `percentile`: clip at a percentile of |x| (symmetric) or at (100 - p, p) (asymmetric).
- `mse`: the clipping range minimizing the expected squared quantization error for the bit width.
- `kl`: TensorRT-style entropy calibration: the threshold whose quantized histogram is closest
  (KL divergence) to the observed one.

The last three read a histogram that `observe` keeps cheaply: a fixed number of bins on a grid
anchored at zero, re-binned exactly (bins merged, never interpolated) when the range grows.

    >>> obs = make_observer(ObserverConfig(kind="mse"))
    >>> for x in calibration_batches:
    ...     obs.observe(x)
    >>> min_val, max_val = obs.range(QuantScheme(bits=8, symmetric=False))
    >>> scale, zero_point = qparams_from_range(min_val, max_val, scheme)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from modelpress.core.config import Config
from modelpress.core.errors import ConfigError, DataError
from modelpress.primitives.affine import QuantScheme, qparams_from_range

ObserverKind = Literal["minmax", "moving_average", "percentile", "mse", "kl"]
_KINDS: tuple[str, ...] = get_args(ObserverKind)
_HISTOGRAM_KINDS = ("percentile", "mse", "kl")


@dataclass(frozen=True)
class ObserverConfig(Config):
    """Which range estimator to use and its knobs (each only read by its own kind)."""

    kind: ObserverKind = "minmax"
    averaging_constant: float = 0.01  # moving_average: weight of the newest batch
    percentile: float = 99.99  # percentile: kept mass in percent
    bins: int = 2048  # histogram kinds; TensorRT's entropy calibration uses 2048
    search_steps: int = 100  # mse: candidate clipping ranges per side

    def validate(self) -> None:
        name = type(self).__name__
        if self.kind not in _KINDS:
            raise ConfigError(f"{name}.kind must be one of {', '.join(map(repr, _KINDS))}, got {self.kind!r}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ConfigError(f"{name}.averaging_constant must be in (0, 1], got {self.averaging_constant}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(
                f"{name}.percentile must be in (50, 100] (the kept mass in percent), got {self.percentile}"
            )
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or not 256 <= self.bins <= 16384:
            raise ConfigError(f"{name}.bins must be an integer in [256, 16384], got {self.bins!r}")
        steps = self.search_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise ConfigError(f"{name}.search_steps must be an integer in [1, 1000], got {steps!r}")


class Observer:
    """Sees calibration batches (`observe`), then gives a range to quantize with (`range`).

    Keeps the running min/max per tensor and, when made with `channel_axis`, per channel along it.
    Subclasses change how batches are folded in and how the range is chosen.
    """

    def __init__(self, cfg: ObserverConfig, channel_axis: int | None = None):
        self.cfg = cfg
        self.channel_axis = channel_axis
        self.batches = 0
        self.min_val: torch.Tensor | None = None  # () running statistics, float32
        self.max_val: torch.Tensor | None = None
        self.channel_min: torch.Tensor | None = None  # (C,) along channel_axis
        self.channel_max: torch.Tensor | None = None
        self._ndim = 0

    def observe(self, x: torch.Tensor) -> None:
        """Fold one calibration batch into the statistics."""
        x = x.detach().float()
        if x.numel() == 0:
            raise DataError(f"cannot observe an empty tensor (shape {tuple(x.shape)})")
        mn, mx = torch.aminmax(x)
        if not (torch.isfinite(mn) and torch.isfinite(mx)):  # NaN and inf propagate into min/max
            raise DataError(
                f"calibration batch {self.batches} has non-finite values (NaN or inf), shape {tuple(x.shape)}"
            )
        self._update(mn, mx, *self._channel_minmax(x))
        self._observe_extra(x, float(mn), float(mx))
        self.batches += 1

    def range(self, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
        """(min_val, max_val) to quantize with: scalars per tensor, broadcastable (1, C, 1, ...) per channel."""
        if self.batches == 0 or self.min_val is None or self.max_val is None:
            raise DataError("no calibration batches were observed; call observe(x) on at least one batch first")
        if scheme.granularity == "channel":
            return self._channel_range(scheme)
        if scheme.granularity != "tensor":
            raise ConfigError(
                f"observers estimate static ranges for granularity 'tensor' or 'channel', got {scheme.granularity!r} "
                "(group and token ranges come from the tensor itself, see reduce_range)"
            )
        return self._tensor_range(scheme)

    # Subclass hooks ---------------------------------------------------------------------------

    def _update(self, mn: torch.Tensor, mx: torch.Tensor, cmin: torch.Tensor | None, cmax: torch.Tensor | None) -> None:
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val, self.channel_min, self.channel_max = mn, mx, cmin, cmax
            return
        self.min_val = self._fold(self.min_val, mn, torch.minimum)
        self.max_val = self._fold(self.max_val, mx, torch.maximum)
        if self.channel_min is not None and self.channel_max is not None and cmin is not None and cmax is not None:
            self.channel_min = self._fold(self.channel_min, cmin, torch.minimum)
            self.channel_max = self._fold(self.channel_max, cmax, torch.maximum)

    def _fold(self, running: torch.Tensor, batch: torch.Tensor, extreme: Callable[..., torch.Tensor]) -> torch.Tensor:
        """A running statistic updated with a batch's (`extreme` is torch.minimum or torch.maximum)."""
        return extreme(running, batch)

    def _observe_extra(self, x: torch.Tensor, mn: float, mx: float) -> None:
        pass

    def _tensor_range(self, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val.clone(), self.max_val.clone()

    # Per-channel plumbing ---------------------------------------------------------------------

    def _channel_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.channel_axis is None:
            return None, None
        if not -x.dim() <= self.channel_axis < x.dim():
            raise DataError(f"channel_axis {self.channel_axis} is out of range for a batch of shape {tuple(x.shape)}")
        axis = self.channel_axis % x.dim()
        if self.channel_min is not None and (x.dim() != self._ndim or x.shape[axis] != self.channel_min.numel()):
            raise DataError(
                f"batch of shape {tuple(x.shape)} has {x.shape[axis]} channels along axis {self.channel_axis}, "
                f"earlier batches had {self.channel_min.numel()} (rank {self._ndim})"
            )
        self._ndim = x.dim()
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, rest)
        cmin, cmax = torch.aminmax(rows, dim=1)
        return cmin, cmax

    def _channel_range(self, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channel_min is None or self.channel_max is None or self.channel_axis is None:
            raise ConfigError(
                "per-channel ranges need per-channel statistics: make the observer with "
                f"make_observer(cfg, channel_axis={scheme.axis})"
            )
        if scheme.axis % self._ndim != self.channel_axis % self._ndim:
            raise ConfigError(
                f"scheme axis {scheme.axis} does not match the observer's channel_axis {self.channel_axis}"
            )
        shape = [1] * self._ndim
        shape[self.channel_axis % self._ndim] = -1
        return self.channel_min.reshape(shape).clone(), self.channel_max.reshape(shape).clone()


class MinMaxObserver(Observer):
    """Running min and max: exact, but one outlier sets the whole range."""


class MovingAverageObserver(Observer):
    """Exponential moving average of per-batch min/max: `m <- m + c * (batch_m - m)`."""

    def _fold(self, running: torch.Tensor, batch: torch.Tensor, extreme: Callable[..., torch.Tensor]) -> torch.Tensor:
        return running + self.cfg.averaging_constant * (batch - running)


# Histogram -------------------------------------------------------------------------------------


@dataclass
class Histogram:
    """Counts on the grid `[start * width, (start + bins) * width)`: anchored at zero, so that
    0 is always a bin edge and the |x| histogram is an exact fold of the signed one."""

    counts: torch.Tensor  # (bins,) float64, on CPU
    width: float
    start: int  # index of the first bin on the infinite grid k * width

    @property
    def bins(self) -> int:
        return self.counts.numel()

    def centers(self) -> torch.Tensor:
        return (torch.arange(self.bins, dtype=torch.float64) + self.start + 0.5) * self.width

    def folded(self) -> torch.Tensor:
        """Counts of |x| on bins `[k * width, (k + 1) * width)`, k = 0, 1, ..."""
        k = torch.arange(self.bins) + self.start  # grid index of each bin
        idx = torch.where(k >= 0, k, -k - 1)  # [k w, (k+1) w) with k < 0 folds onto -k - 1
        out = torch.zeros(int(idx.max()) + 1, dtype=torch.float64)
        return out.index_add_(0, idx, self.counts)


def new_histogram(mn: float, mx: float, bins: int) -> Histogram:
    """An empty histogram whose bins cover `[min(mn, 0), max(mx, 0)]`."""
    lo, hi = min(mn, 0.0), max(mx, 0.0)
    width = max((hi - lo) / (bins - 1), 1e-30)  # bins - 1: the anchored grid may need one extra bin
    return Histogram(torch.zeros(bins, dtype=torch.float64), width, math.floor(lo / width))


def grow_histogram(h: Histogram, mn: float, mx: float) -> Histogram:
    """`h` re-binned so that it also covers `[mn, mx]`: bins merge `k` at a time (exact, no
    interpolation), so the grid stays anchored at zero and no mass moves across a bin edge."""
    lo_idx = min(h.start, math.floor(mn / h.width))
    hi_idx = max(h.start + h.bins - 1, math.floor(mx / h.width))
    if lo_idx == h.start and hi_idx == h.start + h.bins - 1:
        return h
    k = max(1, -(-(hi_idx - lo_idx + 1) // h.bins))  # merge factor (a Python int: it can be huge)
    if hi_idx // k - lo_idx // k + 1 > h.bins:  # misaligned: this k always fits
        k = max(k + 1, (hi_idx - lo_idx) // (h.bins - 1) + 1)
    start = lo_idx // k
    # Spread the spare bins over both sides of zero in proportion to their extent, so that the
    # next slightly wider batch fits without another merge.
    spare = h.bins - (hi_idx // k - start + 1)
    start -= round(spare * -lo_idx / max(hi_idx - lo_idx, 1))
    # Old grid indices lie in [-bins, 2 bins): dividing by min(k, 4 bins) floors them the same way.
    old = torch.arange(h.bins, dtype=torch.int64) + h.start
    idx = old.div(min(k, 4 * h.bins), rounding_mode="floor") - start
    counts = torch.zeros_like(h.counts).index_add_(0, idx, h.counts)
    return Histogram(counts, h.width * k, start)


def add_to_histogram(h: Histogram, x: torch.Tensor) -> Histogram:
    """`h` plus the counts of `x`, whose values lie inside the grid (up to rounding, hence the clamp).

    Out of place, so that batches observed under `torch.inference_mode()` and outside it mix.
    """
    lo, hi = h.start * h.width, (h.start + h.bins) * h.width
    counts = torch.histc(x.clamp(lo, hi), bins=h.bins, min=lo, max=hi)
    return Histogram(h.counts + counts.to("cpu", torch.float64), h.width, h.start)


class HistogramObserver(Observer):
    """Running min/max plus a histogram; the range comes from `percentile_range`, `mse_range` or `kl_range`."""

    def __init__(self, cfg: ObserverConfig, channel_axis: int | None = None):
        super().__init__(cfg, channel_axis)
        self.histogram: Histogram | None = None
        self.zeros = 0.0  # exact zeros (ReLU, padding) cost no rounding error: the MSE search uses it

    def _observe_extra(self, x: torch.Tensor, mn: float, mx: float) -> None:
        if self.histogram is None:
            h = new_histogram(mn, mx, self.cfg.bins)
        else:
            h = grow_histogram(self.histogram, mn, mx)
        self.histogram = add_to_histogram(h, x)
        self.zeros += float((x == 0).sum())

    def _channel_range(self, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError(
            f"observer kind {self.cfg.kind!r} estimates per-tensor ranges only; "
            "use kind 'minmax' or 'moving_average' for granularity 'channel'"
        )

    def _tensor_range(self, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.histogram is not None and self.min_val is not None and self.max_val is not None
        mn, mx = float(self.min_val), float(self.max_val)
        if self.cfg.kind == "percentile":
            lo, hi = percentile_range(self.histogram, self.cfg.percentile, scheme.symmetric)
        elif self.cfg.kind == "mse":
            lo, hi = mse_range(self.histogram, mn, mx, scheme, self.cfg.search_steps, self.zeros)
        else:
            lo, hi = kl_range(self.histogram, scheme)
        # Within what was seen: the histogram grid may reach past the data.
        lo, hi = min(max(lo, mn), mx), max(min(hi, mx), mn)
        return torch.tensor(lo).to(self.min_val), torch.tensor(hi).to(self.max_val)


# Range choice from a histogram: pure functions ---------------------------------------------------


def _quantile(counts: torch.Tensor, width: float, start: int, q: float) -> float:
    """Value below which a fraction `q` of the mass lies (uniform within each bin)."""
    cum = torch.cumsum(counts, 0)
    target = q * float(cum[-1])
    i = min(int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))), counts.numel() - 1)
    before = float(cum[i - 1]) if i > 0 else 0.0
    frac = (target - before) / float(counts[i]) if counts[i] > 0 else 0.0
    return (start + i + min(max(frac, 0.0), 1.0)) * width


def percentile_range(h: Histogram, percentile: float, symmetric: bool) -> tuple[float, float]:
    """Clip at the `percentile` of |x| (symmetric), or at percentiles (100 - p, p) of x."""
    p = percentile / 100.0
    if symmetric:
        t = _quantile(h.folded(), h.width, 0, p)
        return -t, t
    return _quantile(h.counts, h.width, h.start, 1.0 - p), _quantile(h.counts, h.width, h.start, p)


def expected_sq_error(
    h: Histogram, lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme, zeros: float = 0.0
) -> torch.Tensor:
    """Expected total squared error of quantizing the histogram's data with ranges `[lo, hi]` (S,).

    Inside the representable grid: rounding noise `scale^2 / 12` per value (exact zeros excepted);
    outside: the clipping error `(x - edge)^2` at bin centers, via prefix sums (O(1) per candidate).
    """
    scale, zp = qparams_from_range(lo.float(), hi.float(), scheme)
    scale, zp = scale.double(), zp.double()
    lo_q, hi_q = (scheme.qmin - zp) * scale, (scheme.qmax - zp) * scale  # (S,) representable edges
    c, n = h.centers(), h.counts
    z = torch.zeros(1, dtype=torch.float64)
    s0, s1, s2 = (torch.cat([z, torch.cumsum(v, 0)]) for v in (n, n * c, n * c * c))  # (bins + 1,)
    i = torch.searchsorted(c, lo_q)  # bins [0, i) lie below lo_q
    j = torch.searchsorted(c, hi_q, right=True)  # bins [j, bins) lie above hi_q
    below = s2[i] - 2 * lo_q * s1[i] + lo_q**2 * s0[i]
    above = (s2[-1] - s2[j]) - 2 * hi_q * (s1[-1] - s1[j]) + hi_q**2 * (s0[-1] - s0[j])
    inside = (s0[j] - s0[i] - zeros).clamp(min=0) * scale**2 / 12
    return below + above + inside


def mse_range(
    h: Histogram, mn: float, mx: float, scheme: QuantScheme, steps: int = 100, zeros: float = 0.0
) -> tuple[float, float]:
    """The clipping range with the least expected squared error, shrinking [mn, mx] in `steps` steps
    (both ends independently for asymmetric schemes)."""
    mn, mx = min(mn, 0.0), max(mx, 0.0)
    f = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    if scheme.symmetric:
        hi = max(-mn, mx) * f
        lo = -hi
    else:
        f = torch.cat([torch.zeros(1, dtype=torch.float64), f])
        lo = (mn * f).repeat_interleave(f.numel())  # (S,) all (lo, hi) pairs
        hi = (mx * f).repeat(f.numel())
    if float(hi.max() - lo.min()) == 0.0:
        return 0.0, 0.0
    err = expected_sq_error(h, lo, hi, scheme, zeros)
    err = torch.where(hi - lo > 0, err, torch.inf)
    best = int(torch.argmin(err))
    return float(lo[best]), float(hi[best])


def kl_divergence_windows(counts: torch.Tensor, start: torch.Tensor, end: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) for each window `[start, end)` of bins (S,), as in TensorRT's entropy calibration.

    P: the counts inside the window, with the mass outside added to the edge bins (clipping).
    Q: the window's counts merged into `levels` equal chunks (quantization), each chunk's mass spread
    back evenly over its non-empty bins. A P bin that Q leaves empty (an empty edge bin that
    received clipped mass) makes the divergence infinite, so that window is never chosen.

    Computed from prefix sums in O(levels) per window instead of O(bins): for the bins b of chunk c,
    sum p_b log(p_b / q_b) = (1 / T) [sum h log h - S_c log(S_c / n_c) - S_c log(T / H)], with T the
    total mass, H the window's, S_c and n_c the chunk's mass and non-empty bins; the two edge bins
    are then corrected for the clipped mass.
    """
    h = counts
    z = torch.zeros(1, dtype=torch.float64)
    hlogh = torch.where(h > 0, h * torch.log(h), 0.0)
    cum_h, cum_hlogh, cum_nz = (torch.cat([z, torch.cumsum(v, 0)]) for v in (h, hlogh, (h > 0).double()))
    total = float(cum_h[-1])
    inside = cum_h[end] - cum_h[start]  # (S,) H
    width = end - start
    c = torch.arange(levels + 1)
    bounds = start[:, None] + (c * width[:, None] + levels - 1) // levels  # (S, levels + 1) chunk edges
    chunk_sum = cum_h[bounds[:, 1:]] - cum_h[bounds[:, :-1]]  # (S, levels)
    chunk_nz = cum_nz[bounds[:, 1:]] - cum_nz[bounds[:, :-1]]
    s_log = torch.where(chunk_sum > 0, chunk_sum * torch.log(chunk_sum / chunk_nz.clamp(min=1)), 0.0)
    kl = (cum_hlogh[end] - cum_hlogh[start]) - s_log.sum(1) - inside * torch.log(total / inside)

    def log_q(b: torch.Tensor, chunk: int) -> torch.Tensor:  # log q_b for a non-empty bin b of `chunk`
        return torch.log(chunk_sum[:, chunk] / chunk_nz[:, chunk].clamp(min=1)) - torch.log(inside)

    for b, clipped, chunk in ((start, cum_h[start], 0), (end - 1, total - cum_h[end], levels - 1)):
        hb = h[b]
        plain = torch.where(hb > 0, hb * (torch.log(hb / total) - log_q(b, chunk)), 0.0)
        pb = hb + clipped
        actual = torch.where(hb > 0, pb * (torch.log(pb / total) - log_q(b, chunk)), torch.inf)
        actual = torch.where(pb > 0, actual, 0.0)
        kl = kl - plain + actual
    return torch.where(inside > 0, kl / total, torch.inf)


def kl_range(h: Histogram, scheme: QuantScheme) -> tuple[float, float]:
    """TensorRT-style entropy calibration: the threshold minimizing KL(P || Q).

    Symmetric: windows `[0, i)` of the |x| histogram with `2^(bits-1)` levels (128 for 8 bits), all
    `i` tried, as in TensorRT. Asymmetric: windows containing zero on the signed histogram with
    `2^bits - 1` levels (255 for 8 bits): first shrunk keeping the data's share of bins left and right
    of zero, then each edge refined on its own (coordinate descent), so that outliers on one side
    do not decide the other. Where the histogram has no more occupied bins than levels (e.g. 16
    bits), quantization is finer than the histogram and the full range is returned.
    """
    if scheme.symmetric:
        counts, start0, levels = h.folded(), 0, 2 ** (scheme.bits - 1)
    else:
        counts, start0, levels = h.counts, h.start, 2**scheme.bits - 1
    occupied = torch.nonzero(counts > 0).flatten()
    zero = -start0  # bin index whose left edge is 0
    lo_bin = min(int(occupied[0]), zero) if occupied.numel() else zero
    hi_bin = max(int(occupied[-1]) + 1, zero) if occupied.numel() else zero
    extent = hi_bin - lo_bin
    if extent <= levels:
        return (start0 + lo_bin) * h.width, (start0 + hi_bin) * h.width

    def argmin(starts: torch.Tensor, ends: torch.Tensor) -> tuple[int, int]:
        best = int(torch.argmin(kl_divergence_windows(counts, starts, ends, levels)))
        return int(starts[best]), int(ends[best])

    widths = torch.arange(levels, extent + 1)  # (S,) candidate window sizes in bins
    left = torch.round(widths * (zero - lo_bin) / extent).long()  # bins kept below zero
    start, end = argmin(zero - left, zero - left + widths)
    if scheme.symmetric:
        return -end * h.width, end * h.width
    for _ in range(4):
        ends = torch.arange(max(start + levels, zero), hi_bin + 1)
        new_end = argmin(torch.full_like(ends, start), ends)[1]
        starts = torch.arange(lo_bin, min(zero, new_end - levels) + 1)
        new_start = argmin(starts, torch.full_like(starts, new_end))[0]
        if (new_start, new_end) == (start, end):
            break
        start, end = new_start, new_end
    return (start0 + start) * h.width, (start0 + end) * h.width


def make_observer(cfg: ObserverConfig, channel_axis: int | None = None) -> Observer:
    """The observer for `cfg.kind`; `channel_axis` keeps per-channel min/max for granularity 'channel'.

    >>> obs = make_observer(ObserverConfig(kind="minmax"), channel_axis=-1)  # (B, T, C) activations
    """
    if cfg.kind == "minmax":
        return MinMaxObserver(cfg, channel_axis)
    if cfg.kind == "moving_average":
        return MovingAverageObserver(cfg, channel_axis)
    if cfg.kind in _HISTOGRAM_KINDS:
        return HistogramObserver(cfg, channel_axis)
    raise ConfigError(f"unknown observer kind {cfg.kind!r}; allowed: {', '.join(map(repr, _KINDS))}")
