"""Mask primitives: exact sparsity, N:M pattern, global ranking, bit packing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.primitives.masks import (
    channel_keep,
    global_rate_masks,
    is_nm_sparse,
    nm_mask,
    num_pruned,
    pack_mask,
    rate_mask,
    threshold_mask,
    unpack_mask,
)

SETTINGS = settings(max_examples=40, deadline=None)


def scores(shape: tuple[int, ...], seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: exercises tie breaking
        return torch.randint(0, 3, shape, generator=g).float()
    return torch.rand(shape, generator=g)


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple),
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
)
def test_rate_mask_prunes_exactly_the_lowest(shape, sparsity, seed, ties):
    s = scores(shape, seed, ties)
    mask = rate_mask(s, sparsity)
    k = round(sparsity * s.numel())
    assert mask.shape == s.shape and mask.dtype == torch.bool
    assert int((~mask).sum()) == k
    if 0 < k < s.numel():
        assert float(s[~mask].max()) <= float(s[mask].min())


@SETTINGS
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
)
def test_nm_mask_keeps_exactly_n_of_every_m(rows, groups, nm, seed, ties):
    n, m = nm
    s = scores((rows, groups * m), seed, ties)
    mask = nm_mask(s, n, m)
    per_group = mask.view(-1, m).sum(dim=1)
    assert bool((per_group == n).all())
    # within each group the kept entries score at least as high as the pruned ones
    g = s.view(-1, m)
    kept = torch.where(mask.view(-1, m), g, torch.inf).amin(dim=1)
    dropped = torch.where(~mask.view(-1, m), g, -torch.inf).amax(dim=1)
    assert bool((kept >= dropped).all())
    assert is_nm_sparse(s * mask, n, m)


def test_nm_mask_rejects_bad_widths():
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(torch.rand(2, 8), 4, 4)


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    sparsity=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**31 - 1),
)
def test_global_masks_prune_exactly_across_layers(sizes, sparsity, seed):
    s = {f"l{i}": scores((n,), seed + i) for i, n in enumerate(sizes)}
    masks = global_rate_masks(s, sparsity)
    total = sum(sizes)
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    kept = torch.cat([s[k][masks[k]] for k in s])
    dropped = torch.cat([s[k][~masks[k]] for k in s])
    if kept.numel() and dropped.numel():
        assert float(dropped.max()) <= float(kept.min())


@SETTINGS
@given(shape=st.lists(st.integers(1, 20), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 2**31 - 1))
def test_pack_mask_round_trip_takes_one_bit_per_entry(shape, seed):
    mask = scores(shape, seed) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def test_threshold_and_rate_errors():
    s = torch.tensor([0.1, 0.5, 0.9])
    assert threshold_mask(s, 0.5).tolist() == [False, False, True]
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.2"):
        num_pruned(10, 1.2)


def test_channel_keep_keeps_at_least_one_and_rounds():
    s = torch.tensor([3.0, 1.0, 2.0, 0.5])
    assert channel_keep(s, 2).tolist() == [0, 2]
    assert channel_keep(s, 4).tolist() == [0]  # never empty
    assert channel_keep(torch.rand(16), 13, round_to=8).numel() == 8
