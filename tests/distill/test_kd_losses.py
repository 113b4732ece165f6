"""Pure KD losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.core.errors import BadInputError
from modelpress.primitives import kd


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in row]
    return [v / sum(e) for v in e]


def test_soft_target_kl_matches_hand_computation() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    temp = 2.0
    p_t, p_s = _softmax([2.0, 0.0, 1.0], temp), _softmax([1.0, 2.0, 0.5], temp)
    expected = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True)) * temp**2
    torch.testing.assert_close(kd.soft_target_kl(s, t, temp), torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_t_squared_scaling_keeps_gradient_scale() -> None:
    # For large T the gradient wrt the student logits tends to (s - t - mean) / C, whatever T: the T² factor at work.
    torch.manual_seed(0)
    s0, t = torch.randn(4, 10), torch.randn(4, 10)
    grads = []
    for temp in (20.0, 40.0):
        s = s0.clone().requires_grad_()
        kd.soft_target_kl(s, t, temp).backward()
        grads.append(s.grad.norm())
    torch.testing.assert_close(grads[0], grads[1], rtol=0.02, atol=0.0)
    # and without T² the value would shrink like 1 / T²: KL(T=40) / KL(T=20) ≈ 1 after scaling
    ratio = kd.soft_target_kl(s0, t, 40.0) / kd.soft_target_kl(s0, t, 20.0)
    assert abs(float(ratio) - 1.0) < 0.02


def test_kd_loss_mixes_soft_and_hard_terms() -> None:
    torch.manual_seed(1)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    soft = kd.soft_target_kl(s, t, 3.0)
    hard = torch.nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(kd.kd_loss(s, t, y, 3.0, 0.25), 0.25 * soft + 0.75 * hard)
    torch.testing.assert_close(kd.kd_loss(s, t, None, 3.0, 0.25), soft)  # unlabelled: soft term alone


def test_kd_loss_ignores_unlabelled_items() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([1, -100, -100, 2])
    hard = torch.nn.functional.cross_entropy(s[[0, 3]], y[[0, 3]])
    expected = 0.5 * kd.soft_target_kl(s, t, 2.0) + 0.5 * hard
    torch.testing.assert_close(kd.kd_loss(s, t, y, 2.0, 0.5), expected)
    all_unlabelled = torch.full((4,), -100)
    torch.testing.assert_close(kd.kd_loss(s, t, all_unlabelled, 2.0, 0.5), kd.soft_target_kl(s, t, 2.0))


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 10.0), st.integers(1, 6), st.integers(2, 9))
def test_kl_is_zero_for_identical_logits_and_positive_otherwise(temp: float, b: int, c: int) -> None:
    torch.manual_seed(b * 31 + c)
    x = torch.randn(b, c)
    assert float(kd.soft_target_kl(x, x.clone(), temp)) == pytest.approx(0.0, abs=1e-5)
    assert float(kd.soft_target_kl(x, x.flip(-1) * 3 + 1, temp)) >= -1e-6


def test_bad_inputs_name_the_values() -> None:
    with pytest.raises(BadInputError, match=r"temperature must be > 0, got 0"):
        kd.soft_target_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(BadInputError, match=r"\(2, 3\).*\(2, 4\)"):
        kd.kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(BadInputError, match="alpha must be in"):
        kd.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), alpha=1.5)
    with pytest.raises(BadInputError, match="cosine, mse"):
        kd.embedding_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="l1")


def test_hidden_mse_masks_padding() -> None:
    s = torch.zeros(1, 3, 2)
    t = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])  # last token is padding
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(kd.hidden_mse(s, t, mask), torch.tensor((1 + 1 + 9 + 9) / 4))


def test_attention_kl_matches_hand_computation_and_masks_queries() -> None:
    p_t = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    p_s = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    t = p_t.reshape(1, 1, 2, 2)
    s = p_s.reshape(1, 1, 2, 2)
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = 1.0 * math.log(1.0 / 0.5)
    torch.testing.assert_close(kd.attention_kl(s, t), torch.tensor((row0 + row1) / 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd.attention_kl(s, t, torch.tensor([[1, 0]])), torch.tensor(row0), rtol=1e-5, atol=1e-6)


def test_embedding_losses() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(kd.embedding_loss(s, t, "cosine"), torch.tensor(0.5))  # (1 - 0 + 1 - 1) / 2
    torch.testing.assert_close(kd.embedding_loss(s, t, "mse"), torch.tensor((1 + 1 + 0 + 1) / 4))
    torch.testing.assert_close(kd.embedding_loss(s, t, "cosine+mse"), torch.tensor(0.5 + 0.75))
