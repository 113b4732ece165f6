"""GPTQ math on tensors: Hessian accumulation, error compensation, act_order, damping and degenerate inputs."""

from __future__ import annotations

import pytest
import torch

from modelpress.core.errors import ConfigError
from modelpress.primitives.affine import QuantScheme, dequantize, dequantize_tensor, quantize_tensor
from modelpress.primitives.gptq import gptq_quantize, hessian_update, layer_output_error


def _correlated(t: int = 2048, k: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated channels of unequal magnitude, as a transformer's hidden states."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(t, k, generator=g) @ mix + 0.1 * torch.randn(t, k, generator=g)
    return x * torch.linspace(0.2, 3.0, k)


def _weight(n: int = 64, k: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_hessian_is_the_running_mean_of_2_xtx():
    x = _correlated(1001, 32)
    h, n = None, 0
    for chunk in (x[:300], x[300:301], x[301:].reshape(-1, 7, 32)):  # any leading shape, uneven batches
        h, n = hessian_update(h, n, chunk)
    assert n == 1001
    torch.testing.assert_close(h, 2 * x.t() @ x / 1001, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(act_order: bool, symmetric: bool):
    x, w = _correlated(), _weight()
    h, _ = hessian_update(None, 0, x)
    scheme = QuantScheme(4, symmetric, "group", group_size=32)
    res = gptq_quantize(w, h, scheme, act_order=act_order, block_size=48)  # blocks not aligned to groups
    w_hat = dequantize(res.q, res.scale, res.zero_point).reshape(w.shape)
    rtn = dequantize_tensor(quantize_tensor(w, scheme))
    gptq_err, rtn_err = layer_output_error(w, w_hat, h), layer_output_error(w, rtn, h)
    assert gptq_err < 0.8 * rtn_err
    # QLinear's layout and range
    assert res.q.shape == (64, 4, 32) and res.scale.shape == (64, 4, 1) and res.zero_point.shape == (64, 4, 1)
    assert res.q.dtype == scheme.storage_dtype
    assert int(res.q.min()) >= scheme.qmin and int(res.q.max()) <= scheme.qmax
    # the solver's own account of the loss matches the measured output error (damping aside)
    assert res.loss == pytest.approx(gptq_err, rel=0.25)


def test_act_order_helps_and_its_permutation_is_undone():
    x, w = _correlated(seed=3), _weight(seed=4)
    h, _ = hessian_update(None, 0, x)
    scheme = QuantScheme(3, False, "group", group_size=64)
    plain = gptq_quantize(w, h, scheme, act_order=False)
    ordered = gptq_quantize(w, h, scheme, act_order=True)
    assert ordered.perm is not None and sorted(ordered.perm.tolist()) == list(range(128))
    diag = torch.diag(h)[ordered.perm]
    assert bool((diag[:-1] >= diag[1:]).all())  # most active inputs first

    def err(r):
        return layer_output_error(w, dequantize(r.q, r.scale, r.zero_point).reshape(w.shape), h)

    assert err(ordered) < err(plain)


@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_gives_round_to_nearest_codes_in_original_order(act_order: bool):
    # No correlation: no error to spread, so GPTQ must return exactly RTN's codes, column for column,
    # which fails if the act_order permutation is not inverted.
    w = _weight(16, 64)
    h = torch.diag(torch.linspace(0.1, 5.0, 64).flip(0)[torch.randperm(64, generator=torch.Generator().manual_seed(0))])
    scheme = QuantScheme(4, False, "group", group_size=16)
    res = gptq_quantize(w, h, scheme, act_order=act_order)
    rtn = quantize_tensor(w, scheme)
    assert torch.equal(res.q, rtn.q)
    torch.testing.assert_close(res.scale, rtn.scale)
    assert torch.equal(res.zero_point, rtn.zero_point)


def test_per_channel_scheme():
    x, w = _correlated(), _weight()
    h, _ = hessian_update(None, 0, x)
    scheme = QuantScheme(4, True, "channel", axis=0)
    res = gptq_quantize(w, h, scheme)
    assert res.q.shape == (64, 128) and res.scale.shape == (64, 1)
    rtn = dequantize_tensor(quantize_tensor(w, scheme))
    w_hat = dequantize(res.q, res.scale, res.zero_point)
    assert layer_output_error(w, w_hat, h) < layer_output_error(w, rtn, h)


def test_indefinite_hessian_raises_damping_with_a_note():
    h = torch.kron(torch.eye(8), torch.tensor([[1.0, 3.0], [3.0, 1.0]]))  # eigenvalues 4 and -2
    res = gptq_quantize(_weight(4, 16), h, QuantScheme(4, False, "group", group_size=16), damp=0.01)
    assert res.damp == pytest.approx(10.0)  # 0.01 -> 0.1 -> 1 (still -1) -> 10
    assert torch.isfinite(res.scale).all()
    assert any("damping raised" in note for note in res.notes)


def test_non_finite_hessian_falls_back_to_round_to_nearest():
    w = _weight(8, 32)
    h = torch.full((32, 32), float("nan"))
    scheme = QuantScheme(4, False, "group", group_size=32)
    res = gptq_quantize(w, h, scheme)
    assert torch.equal(res.q, quantize_tensor(w, scheme).q)
    assert any("non-finite" in note for note in res.notes)


def test_dead_inputs_are_reported():
    x = _correlated(512, 32)
    x[:, 5] = 0
    h, _ = hessian_update(None, 0, x)
    res = gptq_quantize(_weight(8, 32), h, QuantScheme(4, False, "group", group_size=32))
    assert any("1 input column" in note for note in res.notes)
    assert torch.isfinite(res.scale).all()


def test_bad_arguments_name_the_value():
    w, h = _weight(8, 48), torch.eye(48)
    with pytest.raises(ConfigError, match="Hessian shape"):
        gptq_quantize(w, torch.eye(8), QuantScheme(4, False, "group", group_size=16))
    with pytest.raises(ConfigError, match="damp must be in"):
        gptq_quantize(w, h, QuantScheme(4, False, "group", group_size=16), damp=0.0)
