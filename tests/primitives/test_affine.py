"""Property tests of the affine quantization primitives (2-8 and 16 bits, all granularities)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.primitives.affine import (
    QuantScheme,
    dequantize,
    dequantize_tensor,
    fake_quantize,
    group_view,
    qparams_from_range,
    quantize,
    quantize_tensor,
    reduce_range,
)

BITS = [2, 3, 4, 5, 6, 7, 8, 16]
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def schemes_and_shapes(draw: st.DrawFn) -> tuple[QuantScheme, tuple[int, ...]]:
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    granularity = draw(st.sampled_from(["tensor", "channel", "group", "token"]))
    group_size = draw(st.sampled_from([d for d in range(1, shape[-1] + 1) if shape[-1] % d == 0]))
    scheme = QuantScheme(
        bits=draw(st.sampled_from(BITS)),
        symmetric=draw(st.booleans()),
        granularity=granularity,
        axis=draw(st.integers(-len(shape), len(shape) - 1)),
        group_size=group_size,
    )
    return scheme, shape


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, QuantScheme]:
    """A scheme and a tensor: Gaussian, one-signed, sparse, constant or all zero, magnitudes 1e-6..1e6."""
    scheme, shape = draw(schemes_and_shapes())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g) * 10.0 ** draw(st.integers(-6, 6))
    kind = draw(st.sampled_from(["normal", "positive", "negative", "sparse", "constant", "zeros"]))
    if kind == "positive":
        x = x.abs()
    elif kind == "negative":
        x = -x.abs()
    elif kind == "sparse":
        x = x * (torch.rand(shape, generator=g) < 0.3)
    elif kind == "constant":
        x = torch.full(shape, float(x.flatten()[0]))
    elif kind == "zeros":
        x = torch.zeros(shape)
    return x, scheme


@st.composite
def raw_cases(draw: st.DrawFn) -> tuple[torch.Tensor, QuantScheme]:
    """Adversarial values straight from hypothesis (ties, tiny spans, mixed magnitudes)."""
    values = st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=False)
    xs = draw(st.lists(values, min_size=1, max_size=24))
    scheme = QuantScheme(bits=draw(st.sampled_from(BITS)), symmetric=draw(st.booleans()))
    return torch.tensor(xs, dtype=torch.float32), scheme


def slice_reduce(t: torch.Tensor, shape: torch.Size, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `t` (group-viewed or not) per quantization slice."""
    return reduce_range(t.reshape(shape).float(), scheme)


def check_round_trip(x: torch.Tensor, scheme: QuantScheme, extremes: bool = True) -> None:
    """All the invariants; `extremes=False` skips the full-range check (meaningless for subnormal scales)."""
    qt = quantize_tensor(x, scheme)
    x_hat = dequantize_tensor(qt)
    scale, zp = qt.scale, qt.zero_point

    assert qt.q.dtype == scheme.storage_dtype
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.isfinite(x_hat).all()
    # integers exactly within the scheme's range, zero point too
    assert int(qt.q.min()) >= scheme.qmin and int(qt.q.max()) <= scheme.qmax
    assert int(zp.min()) >= scheme.qmin and int(zp.max()) <= scheme.qmax

    # round trip: |x - x_hat| <= scale / 2, plus float32 rounding (relative 2^-24 of values up to 2^bits)
    err = (group_view(x, scheme) - group_view(x_hat, scheme)).abs()
    tol = 0.5 + 2.0 ** (scheme.bits - 21)
    assert (err <= scale * tol).all(), f"max error / scale {float((err / scale).max())}"

    # idempotence: re-quantizing the dequantized tensor gives the same integers. With qparams
    # recomputed from x_hat too where the extremes map exactly onto +-qmax (symmetric): asymmetric
    # extremes exactly half a step off the grid (ties) round inward and shrink x_hat's range.
    assert torch.equal(quantize(group_view(x_hat, scheme), scale, zp, scheme), qt.q)
    if scheme.symmetric:
        assert torch.equal(quantize_tensor(x_hat, scheme).q, qt.q)

    # zero is exactly representable (asymmetric: the zero point is an integer in range)
    zeros = torch.zeros_like(group_view(x, scheme))
    assert torch.equal(dequantize(quantize(zeros, scale, zp, scheme), scale, zp), zeros)

    # fake_quantize computes the same values in float
    torch.testing.assert_close(fake_quantize(x, scale, zp, scheme), x_hat, rtol=0, atol=0)

    # the full integer range is used at the extremes of each slice
    if extremes:
        qlo, qhi = slice_reduce(qt.q, x.shape, scheme)
        xlo, xhi = slice_reduce(x, x.shape, scheme)
        # slices whose natural scale is below the smallest normal float get the floored scale instead
        lo0, hi0 = torch.minimum(xlo, torch.zeros_like(xlo)), torch.maximum(xhi, torch.zeros_like(xhi))
        span = torch.maximum(-lo0, hi0) / scheme.qmax if scheme.symmetric else (hi0 - lo0) / (scheme.qmax - scheme.qmin)
        floored = (span > 0) & (span < torch.finfo(torch.float32).tiny)
        if scheme.symmetric:  # the largest |x| maps to +-qmax (unless the slice is all zero)
            assert ((torch.maximum(-qlo, qhi) == scheme.qmax) | ((xlo == 0) & (xhi == 0)) | floored).all()
        else:  # min maps to qmin or max to qmax (the range is widened to contain 0)
            assert ((qlo == scheme.qmin) | (qhi == scheme.qmax) | floored).all()


@SETTINGS
@given(cases())
def test_round_trip_properties(case: tuple[torch.Tensor, QuantScheme]) -> None:
    check_round_trip(*case)


@SETTINGS
@given(raw_cases())
def test_round_trip_adversarial_values(case: tuple[torch.Tensor, QuantScheme]) -> None:
    check_round_trip(*case)


@SETTINGS
@given(
    lo=st.floats(-(2.0**20), 0.0, width=32),
    hi=st.floats(0.0, 2.0**20, width=32),
    bits=st.sampled_from(BITS),
    symmetric=st.booleans(),
)
def test_qparams_from_range(lo: float, hi: float, bits: int, symmetric: bool) -> None:
    scheme = QuantScheme(bits=bits, symmetric=symmetric)
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), scheme)
    assert math.isfinite(float(scale)) and float(scale) > 0
    assert scheme.qmin <= int(zp) <= scheme.qmax
    assert float(dequantize(quantize(torch.tensor(0.0), scale, zp, scheme), scale, zp)) == 0.0
    # both ends of the range lie within half a step of the representable grid
    for v in (lo, hi):
        v_hat = float(dequantize(quantize(torch.tensor(v), scale, zp, scheme), scale, zp))
        assert abs(v - v_hat) <= float(scale) * (0.5 + 2.0 ** (bits - 21))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group", "token"])
def test_all_zero_tensor(bits: int, symmetric: bool, granularity: str) -> None:
    scheme = QuantScheme(bits=bits, symmetric=symmetric, granularity=granularity, group_size=4)
    x = torch.zeros(3, 8)
    qt = quantize_tensor(x, scheme)
    assert torch.isfinite(qt.scale).all() and (qt.scale > 0).all()
    assert torch.equal(dequantize_tensor(qt), x)
    assert torch.equal(fake_quantize(x, qt.scale, qt.zero_point, scheme), x)


def test_symmetric_hand_example() -> None:
    scheme = QuantScheme(bits=8, symmetric=True)
    qt = quantize_tensor(torch.tensor([-1.0, 0.0, 0.5, 1.27]), scheme)
    torch.testing.assert_close(qt.scale, torch.tensor(0.01), rtol=1e-6, atol=0)
    assert qt.q.tolist() == [-100, 0, 50, 127]


def test_asymmetric_hand_example() -> None:
    scheme = QuantScheme(bits=4, symmetric=False)
    qt = quantize_tensor(torch.tensor([-1.0, 0.0, 2.0]), scheme)  # scale 3 / 15 = 0.2, zero point 5
    torch.testing.assert_close(qt.scale, torch.tensor(0.2), rtol=1e-6, atol=0)
    assert int(qt.zero_point) == 5
    assert qt.q.tolist() == [0, 5, 15]


@pytest.mark.parametrize("values", [[-1e-37, 0.0], [-1e-37, 1e-38], [0.0, 2e-38], [-1e-44, 0.0]])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_tiny_ranges(values: list[float], bits: int) -> None:
    """Ranges narrower than ~3e-36 give a subnormal scale: the zero point must use that same scale
    (it used to be computed with the scale clamped to the smallest normal float: errors of 100 steps)."""
    for symmetric in (False, True):
        check_round_trip(torch.tensor(values), QuantScheme(bits=bits, symmetric=symmetric), extremes=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(bad: float) -> None:
    x = torch.tensor([0.5, bad, -1.0])
    with pytest.raises(ValueError, match="non-finite"):
        quantize_tensor(x, QuantScheme())
