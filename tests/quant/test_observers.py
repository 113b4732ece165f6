"""Observers: exact min/max, moving average, percentile, MSE and KL range choice, errors, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.core.errors import ConfigError
from modelpress.primitives.affine import QuantScheme, fake_quantize, qparams_from_range
from modelpress.quant.observers import (
    ObserverConfig,
    add_to_histogram,
    grow_histogram,
    kl_divergence_windows,
    make_observer,
    new_histogram,
)

KINDS = ["minmax", "moving_average", "percentile", "mse", "kl"]


def gaussian_with_outliers(n: int, outliers: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[: len(outliers)] = torch.tensor(outliers)
    return x[torch.randperm(n, generator=g)]


def observed(kind: str, batches: list[torch.Tensor] | tuple[torch.Tensor, ...], **cfg: object):
    obs = make_observer(ObserverConfig(kind=kind, **cfg))  # type: ignore[arg-type]
    for b in batches:
        obs.observe(b)
    return obs


def test_minmax_is_exact_per_tensor_and_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, generator=g) * (i + 1) for i in range(3)]
    obs = make_observer(ObserverConfig(kind="minmax"), channel_axis=1)
    for b in batches:
        obs.observe(b)
    allx = torch.cat(batches)
    lo, hi = obs.range(QuantScheme(granularity="tensor"))
    assert lo.shape == () and float(lo) == float(allx.min()) and float(hi) == float(allx.max())
    lo, hi = obs.range(QuantScheme(granularity="channel", axis=1))
    assert lo.shape == (1, 3, 1)
    assert torch.equal(lo, allx.amin(dim=(0, 2), keepdim=True))
    assert torch.equal(hi, allx.amax(dim=(0, 2), keepdim=True))


def test_moving_average_hand_computed() -> None:
    batches = [torch.tensor([-1.0, 1.0]), torch.tensor([-3.0, 5.0]), torch.tensor([0.0, 1.0])]
    obs = observed("moving_average", batches, averaging_constant=0.5)
    lo, hi = obs.range(QuantScheme())
    # min: -1 -> -1 + 0.5 (-3 + 1) = -2 -> -2 + 0.5 (0 + 2) = -1; max: 1 -> 3 -> 2
    assert float(lo) == -1.0 and float(hi) == 2.0


def test_moving_average_per_channel() -> None:
    obs = make_observer(ObserverConfig(kind="moving_average", averaging_constant=0.25), channel_axis=-1)
    obs.observe(torch.tensor([[0.0, -2.0], [4.0, 2.0]]))  # channel min/max: (0, -2) / (4, 2)
    obs.observe(torch.tensor([[-4.0, 2.0], [8.0, 6.0]]))  # (-4, 2) / (8, 6)
    lo, hi = obs.range(QuantScheme(granularity="channel", axis=-1))
    assert lo.tolist() == [[-1.0, -1.0]] and hi.tolist() == [[5.0, 3.0]]


def test_percentile_ignores_a_few_huge_outliers() -> None:
    x = gaussian_with_outliers(100_000, [1000.0, -500.0, 800.0])
    obs = observed("percentile", x.split(10_000), percentile=99.9)
    width = obs.histogram.width  # ~1500 / 2048, coarser after re-binning (the first batch is narrower)
    assert width < 3 * 1500 / 2047
    lo, hi = obs.range(QuantScheme(symmetric=True))
    assert abs(float(hi) - np.percentile(x.abs().numpy(), 99.9)) <= width and float(lo) == -float(hi)
    assert 3.0 < float(hi) < 5.0  # the 99.9th percentile of |N(0, 1)| is 3.29
    lo, hi = obs.range(QuantScheme(symmetric=False))
    want_lo, want_hi = np.percentile(x.numpy(), [0.1, 99.9])
    assert abs(float(lo) - want_lo) <= width and abs(float(hi) - want_hi) <= width


def test_percentile_matches_numpy_on_a_fine_histogram() -> None:
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) * 2 + 1
    obs = observed("percentile", [x], percentile=99.0, bins=8192)
    lo, hi = obs.range(QuantScheme(symmetric=False))
    want_lo, want_hi = np.percentile(x.numpy(), [1.0, 99.0])
    width = float(x.max() - min(float(x.min()), 0.0)) / 8191
    assert abs(float(lo) - want_lo) < 2 * width and abs(float(hi) - want_hi) < 2 * width
    _, t = obs.range(QuantScheme(symmetric=True))
    assert abs(float(t) - np.percentile(x.abs().numpy(), 99.0)) < 2 * width


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_mse_and_kl_beat_minmax_on_gaussian_with_outliers(kind: str, bits: int, symmetric: bool) -> None:
    """Two outliers in a million (25 and -20 sigma): clipping them pays off at 8 and at 4 bits.

    (With many more outliers, keeping them is MSE-optimal at 8 bits: the MSE observer then keeps
    them too, while KL, which matches distribution shapes, may still clip.)
    """
    x = gaussian_with_outliers(2**20, [25.0, -20.0])
    scheme = QuantScheme(bits=bits, symmetric=symmetric)

    def mse(lo: torch.Tensor, hi: torch.Tensor) -> float:
        scale, zp = qparams_from_range(lo, hi, scheme)
        return float((fake_quantize(x, scale, zp, scheme) - x).pow(2).mean())

    batches = x.split(2**17)
    lo, hi = observed(kind, batches).range(scheme)
    mm_lo, mm_hi = observed("minmax", batches).range(scheme)
    assert float(hi) - float(lo) < 0.5 * (float(mm_hi) - float(mm_lo)), "the outliers should be clipped"
    assert mse(lo, hi) < 0.5 * mse(mm_lo, mm_hi)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_keeps_the_range_when_clipping_costs_more(symmetric: bool) -> None:
    """Uniform data: every value matters, clipping only adds error, so MSE keeps (almost) all of it."""
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * 4 - 1
    lo, hi = observed("mse", [x]).range(QuantScheme(bits=8, symmetric=symmetric))
    assert float(hi) > 0.97 * float(x.max())
    if not symmetric:
        assert float(lo) < 0.97 * float(x.min())


def test_kl_divergence_matches_a_direct_reference() -> None:
    """The prefix-sum KL equals TensorRT's procedure written out bin by bin."""

    def reference(h: np.ndarray, s: int, e: int, levels: int) -> float:
        if h[s:e].sum() == 0:  # all mass clipped: Q is empty
            return float("inf")
        p = h[s:e].copy()
        p[0] += h[:s].sum()
        p[-1] += h[e:].sum()
        sliced = h[s:e]
        chunk = np.arange(e - s) * levels // (e - s)
        q = np.zeros(e - s)
        for c in range(levels):
            nz = (chunk == c) & (sliced > 0)
            if nz.any():
                q[nz] = sliced[chunk == c].sum() / nz.sum()
        p, q = p / p.sum(), q / q.sum()
        if ((p > 0) & (q == 0)).any():
            return float("inf")
        m = p > 0
        return float((p[m] * np.log(p[m] / q[m])).sum())

    rng = np.random.default_rng(0)
    for _ in range(30):
        bins, levels = int(rng.integers(8, 50)), int(rng.integers(2, 8))
        h = rng.poisson(3.0, bins) * (rng.random(bins) > 0.3) + (np.arange(bins) == 0)
        starts = rng.integers(0, bins - levels + 1, 6)
        ends = np.clip(starts + rng.integers(levels, bins + 1, 6), None, bins)
        got = kl_divergence_windows(
            torch.tensor(h, dtype=torch.float64), torch.tensor(starts), torch.tensor(ends), levels
        )
        want = [reference(h.astype(float), int(s), int(e), levels) for s, e in zip(starts, ends, strict=True)]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.floats(-1e4, 1e4), st.floats(0, 1e4)), min_size=1, max_size=6),
    bins=st.sampled_from([256, 2048]),
)
def test_histogram_keeps_every_value_when_the_range_grows(ranges: list[tuple[float, float]], bins: int) -> None:
    """Re-binning merges whole bins: total mass is kept, the grid covers all values, 0 stays an edge."""
    g = torch.Generator().manual_seed(0)
    h = None
    n = 0
    lo_all, hi_all = 0.0, 0.0
    for center, spread in ranges:
        x = center + spread * torch.randn(1000, generator=g)
        mn, mx = float(x.min()), float(x.max())
        h = new_histogram(mn, mx, bins) if h is None else grow_histogram(h, mn, mx)
        h = add_to_histogram(h, x)
        n += x.numel()
        lo_all, hi_all = min(lo_all, mn), max(hi_all, mx)
    assert h is not None and h.bins == bins
    assert float(h.counts.sum()) == n
    assert h.start * h.width <= lo_all and (h.start + bins) * h.width >= hi_all
    assert h.start <= 0 <= h.start + bins


@pytest.mark.parametrize("kind", KINDS)
def test_ranges_are_within_the_observed_range(kind: str) -> None:
    x = gaussian_with_outliers(50_000, [30.0]) + 0.5
    obs = observed(kind, x.split(5_000), averaging_constant=1.0)
    for symmetric in (True, False):
        lo, hi = obs.range(QuantScheme(bits=8, symmetric=symmetric))
        assert torch.isfinite(lo) and torch.isfinite(hi)
        assert float(x.min()) <= float(lo) <= float(hi) <= float(x.max())


@pytest.mark.parametrize("kind", KINDS)
def test_all_zero_batches(kind: str) -> None:
    obs = observed(kind, [torch.zeros(64), torch.zeros(8, 8)])
    lo, hi = obs.range(QuantScheme(bits=8, symmetric=False))
    assert float(lo) == 0.0 and float(hi) == 0.0
    scale, zp = qparams_from_range(lo, hi, QuantScheme(bits=8, symmetric=False))
    assert torch.isfinite(scale) and float(scale) > 0


@pytest.mark.parametrize("kind", ["percentile", "mse", "kl"])
def test_histogram_kinds_mix_inference_mode_and_grad_mode(kind: str) -> None:
    obs = make_observer(ObserverConfig(kind=kind))
    with torch.inference_mode():
        obs.observe(torch.randn(1000))
    obs.observe(torch.randn(1000, requires_grad=True) * 3)
    lo, hi = obs.range(QuantScheme())
    assert float(lo) < 0 < float(hi)


@pytest.mark.parametrize("kind", KINDS)
def test_errors(kind: str) -> None:
    obs = make_observer(ObserverConfig(kind=kind))
    with pytest.raises(ValueError, match="no calibration batches were observed"):
        obs.range(QuantScheme())
    with pytest.raises(ValueError, match="empty"):
        obs.observe(torch.zeros(0, 4))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="non-finite"):
            obs.observe(torch.tensor([1.0, bad]))
    obs.observe(torch.randn(16, 4))
    with pytest.raises(ConfigError, match="granularity 'tensor' or 'channel', got 'token'"):
        obs.range(QuantScheme(granularity="token"))
    with pytest.raises(ConfigError, match="channel"):  # no per-channel statistics kept
        obs.range(QuantScheme(granularity="channel"))


def test_channel_errors() -> None:
    obs = make_observer(ObserverConfig(kind="minmax"), channel_axis=1)
    obs.observe(torch.randn(2, 3))
    with pytest.raises(ValueError, match="has 4 channels along axis 1, earlier batches had 3"):
        obs.observe(torch.randn(2, 4))
    with pytest.raises(ConfigError, match="does not match the observer's channel_axis 1"):
        obs.range(QuantScheme(granularity="channel", axis=0))
    kl = make_observer(ObserverConfig(kind="kl"), channel_axis=0)
    kl.observe(torch.randn(2, 3))
    with pytest.raises(ConfigError, match="'minmax' or 'moving_average'"):
        kl.range(QuantScheme(granularity="channel"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "median", r"ObserverConfig.kind must be one of 'minmax', 'moving_average', .*got 'median'"),
        ("averaging_constant", 0.0, r"averaging_constant must be in \(0, 1\], got 0.0"),
        ("averaging_constant", 1.5, r"averaging_constant must be in \(0, 1\], got 1.5"),
        ("percentile", 30.0, r"percentile must be in \(50, 100\] .*got 30.0"),
        ("bins", 100, r"bins must be an integer in \[256, 16384\], got 100"),
        ("bins", 2048.0, r"bins must be an integer in \[256, 16384\], got 2048.0"),
        ("search_steps", 0, r"search_steps must be an integer in \[1, 1000\], got 0"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ObserverConfig(**{field: value})  # type: ignore[arg-type]


def test_config_round_trips_through_dict() -> None:
    cfg = ObserverConfig(kind="percentile", percentile=99.9)
    assert ObserverConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="ObserverConfig.kind must be one of"):
        ObserverConfig.from_dict({"kind": "histogram"})
    assert isinstance(make_observer(cfg).cfg, ObserverConfig)
