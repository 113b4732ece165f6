"""Skip markers for tests that need (or must not have) a CPU feature, named in the skip reason."""

from __future__ import annotations

import pytest

from modelpress.core.environment import cpu_info, has_feature


def needs(feature: str) -> pytest.MarkDecorator:
    """Skip unless the kernels may use `feature` here (e.g. "amx_int8", "avx512_vnni")."""
    return pytest.mark.skipif(not has_feature(feature), reason=f"needs the CPU feature {feature} ({_here()})")


def lacks(feature: str) -> pytest.MarkDecorator:
    """Skip where the kernels may use `feature`: the test is about CPUs without it."""
    return pytest.mark.skipif(has_feature(feature), reason=f"about CPUs without {feature} ({_here()})")


def _here() -> str:
    info = cpu_info()
    return f"this CPU: {info['model']}, usable: {', '.join(info['usable']) or 'none'}"


def _exact() -> bool:
    from modelpress.core.environment import int8_gemm_exact

    return int8_gemm_exact()


# oneDNN's int8 GEMM is exact only with VNNI or AMX; elsewhere int8-activation layers run their reference path
needs_exact_int8 = pytest.mark.skipif(
    not _exact(), reason=f"needs an exact int8 GEMM (VNNI or AMX; AVX2 saturates in int16) ({_here()})"
)
