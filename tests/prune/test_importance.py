"""Importance scores and the pruning schedule."""

from __future__ import annotations

import pytest
import torch

from modelpress.core import ConfigError
from modelpress.prune import PolynomialSchedule
from modelpress.prune.importance import channel_scores, element_scores, movement_update, select


def test_element_scores_follow_their_definitions():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    g = torch.tensor([[0.1, 0.1], [-4.0, 3.0]])
    torch.testing.assert_close(element_scores("magnitude", w), w.abs())
    torch.testing.assert_close(element_scores("magnitude", w, norm="l2"), w.pow(2))
    torch.testing.assert_close(element_scores("gradient", w, g), g.abs())
    torch.testing.assert_close(element_scores("taylor", w, g), (w * g).abs())
    torch.testing.assert_close(movement_update(w, g), -(w * g))
    r1, r2 = element_scores("random", w, seed=3), element_scores("random", w, seed=3)
    torch.testing.assert_close(r1, r2)
    with pytest.raises(ValueError, match="needs gradients"):
        element_scores("taylor", w)


def test_channel_scores_sum_normalized_members_and_follow_index_maps():
    conv = torch.zeros(4, 2, 3, 3)
    conv[1] = 1.0  # channel 1 has all the weight
    nxt = torch.zeros(5, 8)  # a Linear reading 4 channels x 2 positions (flatten, repeat 2)
    nxt[:, 2:4] = 1.0  # positions 2, 3 = channel 1
    idx = torch.arange(4).repeat_interleave(2)
    s = channel_scores("magnitude", [(conv, None, 0), (nxt, None, 1)], norm="l1", channel_map=[None, idx])
    assert s.shape == (4,)
    assert int(s.argmax()) == 1 and float(s[0]) == 0.0
    torch.testing.assert_close(s[1], torch.tensor(8.0))  # each member mean-normalized: 4 + 4


def test_select_by_threshold_or_rate():
    s = torch.tensor([0.2, 0.8, 0.5, 0.1])
    assert select(s, threshold=0.3).tolist() == [False, True, True, False]
    assert select(s, sparsity=0.25).tolist() == [True, True, True, False]


def test_polynomial_schedule_rises_from_initial_to_final():
    sched = PolynomialSchedule(initial_sparsity=0.1, steps=100, begin_step=10, frequency=10)
    values = [sched.sparsity_at(t, 0.8) for t in range(0, 130, 5)]
    assert values[0] == 0.0  # before begin_step
    assert sched.sparsity_at(10, 0.8) == pytest.approx(0.1)
    assert sched.sparsity_at(110, 0.8) == pytest.approx(0.8) and sched.sparsity_at(500, 0.8) == pytest.approx(0.8)
    inside = values[2:]
    assert all(b >= a for a, b in zip(inside, inside[1:], strict=False))
    # cubic: more than half of the way after a quarter of the steps
    assert sched.sparsity_at(35, 0.8) > 0.1 + 0.5 * 0.7
    assert sched.is_update_step(20) and not sched.is_update_step(25) and not sched.is_update_step(120)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial_sparsity": 1.0}, r"initial_sparsity must be in \[0, 1\), got 1.0"),
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"frequency": 0}, "frequency must be >= 1, got 0"),
    ],
)
def test_schedule_validation_names_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PolynomialSchedule(**kwargs)
