"""Integer kernels of QLinear: they run where they apply and match the float reference forward."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from torch import nn

from cpu_features import needs_exact_int8
from modelpress.core.numerics import exact, is_exact
from modelpress.primitives.affine import QuantScheme
from modelpress.quant import kernels
from modelpress.quant.modules import ActSpec, QLinear

W8 = QuantScheme(bits=8, symmetric=True, granularity="channel")
ACTS = {
    "static-asym": ActSpec("static"),
    "static-sym": ActSpec("static", symmetric=True),
    "dynamic-tensor-asym": ActSpec("dynamic"),
    "dynamic-tensor-sym": ActSpec("dynamic", symmetric=True),
    "dynamic-token-asym": ActSpec("dynamic", granularity="token"),
    "dynamic-token-sym": ActSpec("dynamic", symmetric=True, granularity="token"),
}


def _qlinear(act: ActSpec, wscheme: QuantScheme = W8, k: int = 96, n: int = 80, seed: int = 0) -> QLinear:
    torch.manual_seed(seed)
    return QLinear.from_float(nn.Linear(k, n), wscheme, act, act_range=(-2.5, 3.0)).eval()


def _reference(module: QLinear, x: torch.Tensor) -> torch.Tensor:
    """The module's float (fake-quant) forward, with the kernels bypassed."""
    with mock.patch.object(kernels, "linear", lambda m, x: None), torch.no_grad():
        return module(x)


def _run(module: QLinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = kernels.linear(module, x)
    assert out is not None, f"no kernel ran for {module.extra_repr()}"
    return out


def _assert_matches(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    # Integer GEMM vs float GEMM of the same integers: only the summation order differs.
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=rel * float(ref.abs().max()))


@needs_exact_int8
@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("shape", [(3, 17, 96), (5, 96), (1, 96)])
def test_int8_activation_kernels_match_reference(name: str, shape: tuple[int, ...]) -> None:
    module = _qlinear(ACTS[name])
    x = torch.randn(*shape) * 1.5
    x[..., 0] = 4.0  # beyond the static range: the clamp must agree too
    _assert_matches(_run(module, x), _reference(module, x), rel=1e-5)


@needs_exact_int8
@pytest.mark.parametrize("name", ["static-asym", "dynamic-token-sym"])
def test_bf16_inputs_give_bf16_outputs_close_to_reference(name: str) -> None:
    module = _qlinear(ACTS[name])
    x = (torch.randn(4, 9, 96) * 1.5).bfloat16()
    # The reference runs its GEMM in bf16 on a bf16-rounded weight: bf16-level agreement only.
    _assert_matches(_run(module, x), _reference(module, x), rel=2e-2)


def test_weight_only_kernel_for_bf16_and_decode_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weight-only int8: aten's int8 GEMM on bf16 inputs, and on fp32 decode rows with bf16 activations (its fp32
    path is scalar); inside `exact()` one fp32 row runs the fp32 kernel and more rows the reference; wide fp32
    inputs take the reference path without bf16 dot products."""
    monkeypatch.setattr(kernels, "bf16_dot_products", lambda: False)
    module = _qlinear(ActSpec("none"))
    x = torch.randn(6, 96)
    gemm = torch.ops.aten._weight_int8pack_mm
    with mock.patch.object(torch.ops.aten, "_weight_int8pack_mm", wraps=gemm) as spy:
        for rows in (x[:1], x):  # decode steps at batch 1 and 6
            out, ref = _run(module, rows), _reference(module, rows)
            _assert_matches(out, ref, rel=2e-2)
            assert 0 < float((out - ref).norm() / ref.norm()) < 1e-2  # bf16 activations: close, not identical
        assert [c.args[0].dtype for c in spy.call_args_list] == [torch.bfloat16] * 2
        _assert_matches(_run(module, x.bfloat16()), _reference(module, x.bfloat16()), rel=2e-2)
        with exact():
            _assert_matches(_run(module, x[:1]), _reference(module, x[:1]), rel=1e-5)
            assert spy.call_args_list[-1].args[0].dtype == torch.float32
            assert kernels.linear(module, x) is None
    # fp32 with many rows and no bf16 dot products: the fp32 GEMM on the dequantized weight, the reference path
    assert kernels.linear(module, torch.randn(kernels.BF16_GEMM_MIN_ROWS, 96)) is None


@pytest.mark.parametrize("k", [4, 8, 24, 40])
def test_weight_only_int8_widths_the_half_kernel_cannot_read_take_the_fp32_paths(k: int) -> None:
    """aten's bf16 int8 GEMM reads K in blocks of 16: at K = 4, 24 or 40 it crashes the process, at 8 it returns
    inf. Such layers keep the fp32 kernel on one row and the reference path otherwise."""
    module = _qlinear(ActSpec("none"), k=k)
    x = torch.randn(3, k)
    _assert_matches(_run(module, x[:1]), _reference(module, x[:1]), rel=1e-5)
    assert kernels.linear(module, x) is None and kernels.linear(module, x.bfloat16()) is None


@pytest.mark.parametrize(
    ("wscheme", "act"),
    [
        (QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32), ActSpec("dynamic")),
        (QuantScheme(bits=8, symmetric=False, granularity="channel"), ActSpec("static")),
        (W8, ActSpec("dynamic", bits=12)),
    ],
    ids=["int4-groups", "asym-weights", "int12-activations"],
)
def test_no_kernel_where_none_fits(wscheme: QuantScheme, act: ActSpec) -> None:
    module = _qlinear(act, wscheme)
    assert kernels.unsupported_reason(module) is not None
    x = torch.randn(2, 96)
    assert kernels.linear(module, x) is None
    assert module(x).shape == (2, 80)  # the module still runs, on the reference path


@needs_exact_int8
def test_sub_byte_symmetric_weights_run_on_the_int8_kernel() -> None:
    module = _qlinear(
        ActSpec("dynamic", granularity="token"), QuantScheme(bits=4, symmetric=True, granularity="channel")
    )
    x = torch.randn(7, 96)
    _assert_matches(_run(module, x), _reference(module, x), rel=1e-5)


@needs_exact_int8
def test_module_forward_uses_the_kernel() -> None:
    module = _qlinear(ACTS["static-asym"])
    x = torch.randn(4, 96)
    with mock.patch.object(torch.ops.onednn, "qlinear_pointwise", wraps=torch.ops.onednn.qlinear_pointwise) as spy:
        with torch.no_grad():
            module(x)
    assert spy.call_count == 1


@needs_exact_int8
def test_packed_weight_follows_weight_updates_and_stays_out_of_copies() -> None:
    module = _qlinear(ACTS["dynamic-tensor-sym"])
    other = _qlinear(ACTS["dynamic-tensor-sym"], seed=1)
    x = torch.randn(3, 96)
    _run(module, x)  # packs and caches
    copied = copy.deepcopy(module)  # the opaque packed weight is not part of the module
    assert set(module.state_dict()) == set(copied.state_dict())
    module.load_state_dict(other.state_dict())  # in-place copy_: the cache must notice
    _assert_matches(_run(module, x), _reference(other, x), rel=1e-5)
    _assert_matches(_run(copied, x), _reference(copied, x), rel=1e-5)


def test_inputs_that_need_gradients_take_the_reference_path() -> None:
    module = _qlinear(ACTS["static-asym"])
    x = torch.randn(2, 96, requires_grad=True)
    assert kernels.linear(module, x) is None
    module(x).sum().backward()
    assert x.grad is not None


@needs_exact_int8
@pytest.mark.parametrize("name", list(ACTS))
def test_decomposed_form_matches_reference(name: str) -> None:
    """The traced (Inductor pattern) form computes the same function, run eagerly."""
    module = _qlinear(ACTS[name])
    x = torch.randn(2, 11, 96) * 1.5
    with torch.no_grad():
        out = kernels.decomposed_linear(module, x)
    assert out is not None
    _assert_matches(out, _reference(module, x), rel=1e-4)


def test_without_vnni_or_amx_int8_activation_layers_run_their_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # oneDNN's AVX2 int8 GEMM saturates u8 x s8 pairs in int16: those layers compute in float instead
    from modelpress.core import environment

    avx2 = {**environment.cpu_info(), "int8": "avx2"}
    monkeypatch.setattr(environment, "cpu_info", lambda: avx2)
    static = _qlinear(ACTS["static-asym"])
    x = torch.randn(4, 96)
    assert kernels.linear(static, x) is None and not kernels.decomposed_linear_applies(static)
    torch.testing.assert_close(static(x), _reference(static, x))
    weight_only = _qlinear(ActSpec("none"))
    assert kernels.linear(weight_only, x[:1]) is not None  # weight-only int8 does not go through that GEMM


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "group", "k"), [(4, 32, 80), (3, 64, 96), (4, 128, 256)])
def test_group_wise_4bit_weights_run_the_int4_gemm_on_decode_steps_and_the_bf16_gemm_on_prefills(
    symmetric: bool, bits: int, group: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group-wise <= 4-bit layer runs aten's int4 GEMM on a decode step's rows and oneDNN's bf16 GEMM on its
    dequantized weight from `BF16_GEMM_MIN_ROWS` rows on (both the reference within bf16 rounding); a short last
    group is padded; an input that needs its gradient and `exact()` take the reference path, and so does a prefill
    on a CPU without bf16 dot products (its decode steps keep the int4 GEMM)."""
    monkeypatch.setattr(kernels, "bf16_dot_products", lambda: True)
    module = _qlinear(ActSpec(), QuantScheme(bits=bits, symmetric=symmetric, granularity="group", group_size=group),
                      k=k)  # fmt: skip
    gemm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def run(x: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, int, int]:
        with mock.patch.object(torch.ops.aten, "_weight_int4pack_mm_for_cpu", wraps=gemm) as int4, \
                mock.patch.object(kernels, "_bf16_gemm_linear", wraps=kernels._bf16_gemm_linear) as bf16:  # fmt: skip
            with torch.set_grad_enabled(grad):
                out = module(x)
        return out.detach(), int4.call_count, bf16.call_count

    wide = kernels.BF16_GEMM_MIN_ROWS
    # decode steps (batch 1 and 8), the widest input the int4 GEMM takes, a prefill of two prompts
    for shape, path in (((1, 1, k), (1, 0)), ((8, 1, k), (1, 0)), ((wide - 1, k), (1, 0)), ((2, wide, k), (0, 1))):
        x = torch.randn(*shape)
        out, *calls = run(x)
        assert tuple(calls) == path, shape
        ref = _reference(module, x)
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 * float(ref.abs().max()))
        assert 0 < float((out - ref).norm() / ref.norm()) < 1e-2  # bf16 activations: close, not identical
    x = torch.randn(2, wide, k, requires_grad=True)
    out, *calls = run(x, grad=True)
    assert calls == [0, 0] and float((out - _reference(module, x.detach())).norm()) < 1e-5 * float(out.norm())
    with exact():  # the passes and the exports' parity references: the float reference, exactly
        out, *calls = run(x.detach())
    assert calls == [0, 0] and float((out - _reference(module, x.detach())).norm() / out.norm()) < 1e-6
    monkeypatch.setattr(kernels, "bf16_dot_products", lambda: False)
    assert run(torch.randn(1, k))[1:] == (1, 0)
    x = torch.randn(2, wide, k)
    out, *calls = run(x)
    assert calls == [0, 0] and float((out - _reference(module, x)).norm() / out.norm()) < 1e-6


@pytest.mark.parametrize(
    "wscheme",
    [W8, QuantScheme(bits=8, symmetric=False, granularity="group", group_size=32),
     QuantScheme(bits=6, symmetric=True, granularity="group", group_size=64)],
    ids=["int8-channel", "int8-group-asym", "int6-group-ragged"],
)  # fmt: skip
def test_other_weight_only_layers_run_the_bf16_gemm_on_wide_inputs(
    wscheme: QuantScheme, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weight-only layers the int4 GEMM does not take (5-8 bits, per channel) run the bf16 GEMM on their
    dequantized weight from `BF16_GEMM_MIN_ROWS` rows on, and keep their other paths below it."""
    monkeypatch.setattr(kernels, "bf16_dot_products", lambda: True)
    module = _qlinear(ActSpec(), wscheme, k=80)  # 80: a short last group of 16 for groups of 64
    wide = kernels.BF16_GEMM_MIN_ROWS
    with mock.patch.object(kernels, "_bf16_gemm_linear", wraps=kernels._bf16_gemm_linear) as bf16:
        x = torch.randn(3, wide, 80)
        with torch.no_grad():
            out = module(x)
        assert bf16.call_count == 1
        ref = _reference(module, x)
        assert 0 < float((out - ref).norm() / ref.norm()) < 1e-2
        with torch.no_grad():
            module(torch.randn(wide - 1, 80))
        assert bf16.call_count == 1
    monkeypatch.setattr(kernels, "bf16_dot_products", lambda: False)
    assert kernels.linear(module, torch.randn(wide, 80)) is None  # no bf16 dot products: the reference path


@pytest.mark.parametrize(("bf16", "native"), [("amx", True), ("avx512_bf16", True), ("none", False)])
def test_bf16_dot_products_follow_the_cpu_as_capped(bf16: str, native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`environment.cpu_info` reports "none" (a string) on a CPU without bf16 dot products, or one capped below
    them by ONEDNN_MAX_CPU_ISA: the bf16 GEMM must then stay off."""
    from modelpress.core import environment

    monkeypatch.setattr(environment, "cpu_info", lambda: {"bf16": bf16})
    assert kernels.bf16_dot_products() is native


def test_passes_and_export_checks_run_the_exact_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass (`registry.apply`) and an export's parity reference see every layer's float reference, so the codes
    a pass writes do not depend on the CPU's bf16 support; outside them the int4 GEMM runs."""
    from modelpress.core import registry
    from modelpress.export.onnx_quant import noise_floor

    module = _qlinear(ActSpec(), QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32))
    x = torch.randn(1, 96)
    seen: list[bool] = []
    spy = mock.patch.object(registry.PASSES, "handler_for", lambda cfg: lambda m, c, ctx: seen.append(
        kernels._int4_applies(module, x)))  # fmt: skip
    with spy:
        registry.apply(module, None, None)
    assert seen == [False] and kernels._int4_applies(module, x) and not is_exact()
    with mock.patch.object(kernels, "_int4_linear", side_effect=AssertionError("the int4 GEMM ran")):
        assert noise_floor(module, (x,)) > 0.99


def test_the_int4_packing_follows_weight_updates_and_needs_no_bf16_dot_products(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g4 = QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32)
    module, other = _qlinear(ActSpec(), g4), _qlinear(ActSpec(), g4, seed=1)
    x = torch.randn(1, 96)
    with torch.no_grad():
        module(x)  # packs and caches
        module.load_state_dict(other.state_dict())  # in-place copy_: the cache must notice
        ref = _reference(other, x)
        assert float((module(x) - ref).norm() / ref.norm()) < 1e-2
    assert not kernels._int4_applies(_qlinear(ActSpec(), g4, n=72), x)  # output channels in tiles of 16 only
    monkeypatch.setattr(kernels, "bf16_dot_products", lambda: False)
    assert kernels._int4_applies(module, x)  # AVX-512 or AVX2 without bf16 dots: still faster than the reference
