"""CPU capabilities: read from the flags, capped by ONEDNN_MAX_CPU_ISA, and the lowering picked from them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from modelpress.core import environment
from modelpress.core.errors import BadInputError
from modelpress.export import inductor

_SHOW = "import json; from modelpress.core.environment import cpu_info; print(json.dumps(cpu_info()))"


def _caps_with(**env: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", _SHOW], env={**os.environ, **env}, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_the_environment_block_records_the_capabilities():
    env = environment.environment(threads=2)
    cpu = env["cpu"]
    assert set(cpu) >= {"model", "features", "usable", "int8", "bf16", "aten", "onednn_max_isa"}
    assert cpu["int8"] in ("amx", "avx512_vnni", "avx_vnni", "avx2", "none")
    assert cpu["bf16"] in ("amx", "avx512_bf16", "none")
    assert set(cpu["usable"]) <= set(cpu["features"])


def test_a_cap_hides_what_comes_after_it():
    capped = _caps_with(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    assert capped["onednn_max_isa"] == "AVX2"
    assert not {"avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"} & set(capped["usable"])
    assert capped["bf16"] == "none" and capped["int8"] in ("avx2", "none")
    if "avx512f" in capped["features"]:  # ATen honours its cap too (it reports what it really runs)
        assert capped["aten"] == "avx2"
    vnni = _caps_with(ONEDNN_MAX_CPU_ISA="AVX512_CORE_VNNI")
    assert "amx_int8" not in vnni["usable"] and "avx512_bf16" not in vnni["usable"]


def _fake(monkeypatch: pytest.MonkeyPatch, int8: str, bf16: str, usable: list[str]) -> None:
    info = {"model": "test CPU", "features": usable, "usable": usable, "int8": int8, "bf16": bf16,
            "onednn_max_isa": None, "aten": "avx512"}  # fmt: skip
    monkeypatch.setattr(environment, "cpu_info", lambda: info)
    monkeypatch.setattr(inductor, "cpu_info", lambda: info)


def test_auto_lowering_follows_the_cpu(monkeypatch: pytest.MonkeyPatch):
    _fake(monkeypatch, "amx", "amx", ["amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"])
    assert inductor.choose_lowering() | {"why": ""} == {"bf16": True, "signed_int8": True, "why": ""}
    _fake(monkeypatch, "avx512_vnni", "avx512_bf16", ["avx512_bf16", "avx512_vnni", "avx512f", "avx2"])
    assert inductor.choose_lowering() | {"why": ""} == {"bf16": True, "signed_int8": False, "why": ""}
    _fake(monkeypatch, "avx2", "none", ["avx2"])
    assert inductor.choose_lowering() | {"why": ""} == {"bf16": False, "signed_int8": False, "why": ""}
    assert inductor.choose_lowering("fp32", "unsigned")["bf16"] is False


def test_an_explicit_lowering_the_cpu_lacks_is_refused_naming_the_feature(monkeypatch: pytest.MonkeyPatch):
    _fake(monkeypatch, "avx2", "none", ["avx2"])
    with pytest.raises(BadInputError, match="needs the CPU feature amx_int8, which this CPU .test CPU. does not"):
        inductor.choose_lowering(int8_sources="signed")
    with pytest.raises(BadInputError, match="needs the CPU feature avx512_bf16"):
        inductor.choose_lowering(pt2_float="bf16")
    with pytest.raises(BadInputError, match="unknown CPU feature 'sse9'"):
        environment.has_feature("sse9")


def test_the_report_says_how_denormals_are_treated() -> None:
    import torch

    from modelpress.core.environment import environment

    assert environment(1)["denormals"]["torch"] == "kept (IEEE)"
    try:
        supported = torch.set_flush_denormal(True)  # False where the CPU has no flush mode
        flushed = environment(1)["denormals"]["torch"]
    finally:
        torch.set_flush_denormal(False)
    assert flushed == ("flushed to zero" if supported else "kept (IEEE)")
